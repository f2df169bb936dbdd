// What each server was last seen serving, kept across processes, in the file the Python
// client keeps too (embedserve/client/lastseen.py, which says why): under fallback
// 'same-model' a process that has not reached its server yet goes by what that server last
// said it serves, so a script run again while its model server is down gets an error, not
// hash vectors to store beside the model's.
//
// The file is served-models.json in $EMBEDSERVE_STATE_DIR, else $XDG_STATE_HOME/embedserve,
// else ~/.local/state/embedserve (%LOCALAPPDATA%\embedserve on Windows), written only when
// what a server serves changes, whole and by rename, holding the MAX_SERVERS servers whose
// news came last. Failing to read or write it only loses the memory.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export const STATE_ENV = 'EMBEDSERVE_STATE_DIR';
export const FILE_NAME = 'served-models.json';
export const MAX_SERVERS = 64;
// What the fallback reads of /info (Fallback.learn); nothing else is kept.
const INFO_KEYS = ['model', 'dimensions'];
const ENTRY_KEYS = ['names', 'model', 'backend', 'dimensions', 'kind'];

export function stateFile() {
  let folder = process.env[STATE_ENV];
  if (!folder) {
    folder = process.platform === 'win32' && process.env.LOCALAPPDATA
      ? path.join(process.env.LOCALAPPDATA, 'embedserve')
      : path.join(process.env.XDG_STATE_HOME || path.join(os.homedir(), '.local', 'state'), 'embedserve');
  }
  return path.join(folder, FILE_NAME);
}

/** The part of a server's /info that says what it serves. */
export function served(info) {
  const pick = (object, keys) => Object.fromEntries(keys.filter((key) => key in object).map((key) => [key, object[key]]));
  const kept = pick(info, INFO_KEYS);
  if (Array.isArray(info.models)) {
    kept.models = info.models.filter((entry) => typeof entry === 'object' && entry !== null && !Array.isArray(entry))
      .map((entry) => pick(entry, ENTRY_KEYS));
  }
  return kept;
}

/** What the server at `url` last said it serves (served()'s form), or null. */
export function recall(url) {
  const info = read()[url]?.info;
  return typeof info === 'object' && info !== null && !Array.isArray(info) ? info : null;
}

/** Keep what the server at `url` serves, if that is news. */
export function remember(url, info) {
  const kept = served(info);
  const servers = read();
  if (Object.hasOwn(servers, url) && JSON.stringify(servers[url]?.info) === JSON.stringify(kept)) return;
  delete servers[url];
  servers[url] = { info: kept, seen: Date.now() / 1000 };
  const urls = Object.keys(servers); // seen order
  for (const old of urls.slice(0, Math.max(0, urls.length - MAX_SERVERS))) delete servers[old];
  write(servers);
}

function read() {
  let content;
  try {
    content = JSON.parse(fs.readFileSync(stateFile(), 'utf8'));
  } catch {
    return {}; // none yet, unreadable or damaged: nothing remembered
  }
  const servers = content?.servers;
  if (typeof servers !== 'object' || servers === null || Array.isArray(servers)) return {};
  const seen = (entry) => (typeof entry?.seen === 'number' && Number.isFinite(entry.seen) ? entry.seen : 0);
  // Seen order, whoever wrote it (the Python client writes the same file).
  return Object.fromEntries(Object.entries(servers).sort(([, a], [, b]) => seen(a) - seen(b)));
}

function write(servers) {
  const file = stateFile();
  const temporary = `${file}.${process.pid}.${Math.random().toString(36).slice(2)}`;
  try {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(temporary, JSON.stringify({ version: 1, servers }, null, 1));
    fs.renameSync(temporary, file);
  } catch {
    try { fs.unlinkSync(temporary); } catch { /* never written */ }
  }
}
