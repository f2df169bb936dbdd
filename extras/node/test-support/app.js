// A tiny application for the exit tests: it lets the client start a server, embeds, prints
// one JSON line about the server, then ends the way argv[3] says, without calling close().
//
//   node app.js URL natural   the event loop runs dry: Node exits on its own
//   node app.js URL exit      process.exit(0) from inside a callback
//   node app.js URL wait      stays alive until a signal ends it
//
// argv[4] 'nowatch' turns off the server's stdin watch (EMBEDSERVE_WATCH_STDIN=0): then only
// the client's exit hooks can stop the server, which is what those tests check.

import { EmbedServeClient } from '../index.js';
import { REPO_ROOT, serverEnv } from './helpers.js';

const [url, mode, watch] = process.argv.slice(2);
const env = { ...serverEnv(), ...(watch === 'nowatch' ? { EMBEDSERVE_WATCH_STDIN: '0' } : {}) };
const client = new EmbedServeClient({ url, env, cwd: REPO_ROOT, startTimeoutMs: 20_000 });
const vectors = await client.embed(['hello from a child process']);
const info = await client.info();
process.stdout.write(`${JSON.stringify({
  serverPid: client.serverPid,
  workerPid: info.pid,
  url: client.url,
  owned: client.ownsServer,
  model: vectors.model,
})}\n`);

if (mode === 'exit') setTimeout(() => process.exit(0), 10);
else if (mode === 'wait') setInterval(() => {}, 1000);
// 'natural': nothing left to do; the server must not keep the program alive.
