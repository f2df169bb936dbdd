// The client's options: defaults, environment variables, validation, and the URL.

import { EmbedServeError } from './errors.js';

export const DEFAULT_PORT = 8765;
export const DEFAULT_URL = `http://127.0.0.1:${DEFAULT_PORT}`;
const FALLBACK_POLICIES = ['same-model', 'always', 'never'];
// The server's --backend choices (embedserve/config.py BACKENDS).
const BACKENDS = ['auto', 'sentence-transformers', 'transformers', 'hash'];
const ENCODING_FORMATS = ['base64', 'float'];

export const DEFAULTS = Object.freeze({
  url: undefined,
  urls: undefined,
  port: undefined,
  autoStart: true,
  restart: true,
  backend: undefined,
  model: undefined,
  dimensions: undefined,
  serverArgs: [],
  env: {},
  cwd: undefined,
  python: undefined,
  apiKey: undefined,
  encodingFormat: 'base64',
  batchSize: undefined,
  timeoutMs: 60_000,
  healthTimeoutMs: 2_000,
  startTimeoutMs: 60_000,
  stopTimeoutMs: 10_000,
  // One request is retried until this long after its first attempt: long enough for a
  // restarted worker to load its model (it answers 503 loading meanwhile).
  retryTimeoutMs: 60_000,
  // Also caps the number of retries when set; unset, only retryTimeoutMs bounds them.
  retries: undefined,
  backoffMs: 100,
  maxBackoffMs: 2_000,
  fallback: 'same-model',
});

/**
 * The options with defaults and environment variables filled in, validated and frozen,
 * and where to look for the server.
 * @param {import('../index.js').EmbedServeOptions} options
 */
export function resolveOptions(options) {
  const opts = { ...DEFAULTS, ...withoutUndefined(options) };
  if (opts.fallback === true) opts.fallback = 'same-model';
  if (opts.fallback === false) opts.fallback = 'never';
  opts.python ??= process.env.EMBEDSERVE_PYTHON || (process.platform === 'win32' ? 'python' : 'python3');
  opts.apiKey ??= opts.env?.EMBEDSERVE_API_KEY || process.env.EMBEDSERVE_API_KEY || undefined;
  validateOptions(opts);
  // Several servers: `urls`, or a url (EMBEDSERVE_URL too) listing them comma-separated.
  const text = opts.url ?? process.env.EMBEDSERVE_URL ?? DEFAULT_URL;
  const urls = opts.urls ?? (String(text).includes(',') ? String(text).split(',').map((u) => u.trim()) : [text]);
  if (urls.length > 1 && opts.port !== undefined) {
    throw new EmbedServeError('invalid option port: it applies to one server; with several urls give each its port',
      { code: 'invalid_option' });
  }
  const targets = urls.map((url) => parseTarget(url, opts.port));
  if (new Set(targets.map((t) => t.base)).size !== targets.length) {
    throw new EmbedServeError(`invalid urls: a server is listed twice (${urls.join(', ')})`, { code: 'invalid_option' });
  }
  // Several servers are someone else's to run: none is ever started for them.
  if (targets.length > 1) opts.autoStart = false;
  return { options: Object.freeze(opts), target: targets[0], targets, settings: serverSettings(opts.env) };
}

/**
 * The EMBEDSERVE_* settings the client itself needs, read once, from what a server it
 * starts would see (`env` over process.env), and parsed as that server parses them: a bad
 * value is an invalid_option error now, not a server that fails to start later or a
 * fallback of a silently other size.
 */
function serverSettings(env) {
  const environment = { ...process.env, ...env };
  const fail = (key, why) => {
    throw new EmbedServeError(`invalid ${key}=${JSON.stringify(environment[key])}: ${why}`,
      { code: 'invalid_option' });
  };
  const settings = { dimensions: undefined, backend: undefined, model: undefined };
  const dimensions = environment.EMBEDSERVE_DIMENSIONS;
  if (dimensions !== undefined) {
    // Python's int(): surrounding whitespace, a sign, digits with single underscores.
    const text = dimensions.trim();
    if (!/^[+-]?\d+(?:_\d+)*$/.test(text)) fail('EMBEDSERVE_DIMENSIONS', 'expected an integer');
    settings.dimensions = Number(text.replaceAll('_', ''));
    if (!Number.isSafeInteger(settings.dimensions)) fail('EMBEDSERVE_DIMENSIONS', 'too large');
    if (!(settings.dimensions >= 1)) fail('EMBEDSERVE_DIMENSIONS', 'dimensions must be at least 1');
  }
  const backend = environment.EMBEDSERVE_BACKEND;
  if (backend !== undefined) {
    if (!BACKENDS.includes(backend)) fail('EMBEDSERVE_BACKEND', `backend must be one of ${BACKENDS.join(', ')}`);
    settings.backend = backend;
  }
  // Several models, comma-separated, for a server that serves several: the first is its default.
  settings.model = (environment.EMBEDSERVE_MODEL ?? '').split(',').map((m) => m.trim()).find(Boolean);
  return Object.freeze(settings);
}

function parseTarget(text, port) {
  const fail = (why, cause) => {
    throw new EmbedServeError(`invalid url ${JSON.stringify(text)}: ${why}`, { code: 'invalid_option', cause });
  };
  const raw = String(text).includes('://') ? String(text) : `http://${text}`;
  let url;
  try {
    url = new URL(raw);
  } catch (cause) {
    fail('expected something like http://127.0.0.1:8765', cause);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') fail('only http:// and https:// are supported');
  if (url.search || url.hash || url.username || url.password) {
    fail("give the server's base URL, without query, fragment or credentials (use the apiKey option)");
  }
  // URL drops a port that is its scheme's own (":80" on http://), which then read as "no
  // port": 8765. A port written is the one meant, as in the Python client.
  const authority = (/^[a-z][a-z0-9+.-]*:\/\/([^/?#]*)/i.exec(raw)?.[1] ?? '').replace(/^.*@/, '');
  const written = /:\d+$/.test(authority.replace(/^\[[^\]]*\]/, ''));
  const schemePort = url.protocol === 'http:' ? '80' : '443';
  const effectivePort = port !== undefined ? String(port)
    : url.port || (written ? schemePort : (url.protocol === 'http:' ? String(DEFAULT_PORT) : '443'));
  const path = url.pathname.replace(/\/+$/, '');
  return {
    protocol: url.protocol,
    hostname: url.hostname, // IPv6 in brackets: [::1]
    port: effectivePort,
    path,
    base: `${url.protocol}//${url.hostname}:${effectivePort}${path}`,
  };
}

export function isLoopback(hostname) {
  const host = hostname.replace(/^\[|\]$/g, '');
  return host === 'localhost' || host === '::1' || /^127\.\d+\.\d+\.\d+$/.test(host);
}

function withoutUndefined(object) {
  return Object.fromEntries(Object.entries(object).filter(([, value]) => value !== undefined));
}

function validateOptions(opts) {
  const fail = (message) => {
    throw new EmbedServeError(`invalid option ${message}`, { code: 'invalid_option' });
  };
  const unknown = Object.keys(opts).filter((key) => !(key in DEFAULTS));
  if (unknown.length) fail(`${unknown.join(', ')}: not an option (see EmbedServeOptions)`);
  if (!FALLBACK_POLICIES.includes(opts.fallback)) {
    fail(`fallback: ${JSON.stringify(opts.fallback)}; expected one of ${FALLBACK_POLICIES.join(', ')}, true or false`);
  }
  if (!ENCODING_FORMATS.includes(opts.encodingFormat)) {
    fail(`encodingFormat: ${JSON.stringify(opts.encodingFormat)}; expected one of ${ENCODING_FORMATS.join(', ')}`);
  }
  if (!Array.isArray(opts.serverArgs) || !opts.serverArgs.every((a) => typeof a === 'string')) {
    fail('serverArgs: expected an array of strings');
  }
  if (typeof opts.env !== 'object' || opts.env === null) fail('env: expected an object');
  if (typeof opts.python !== 'string' || !opts.python) fail('python: expected a command or path');
  if (opts.model !== undefined && !(typeof opts.model === 'string' && opts.model.trim())) {
    fail(`model: ${JSON.stringify(opts.model)}; expected a model name (a started server's --model, and every call's model)`);
  }
  if (opts.urls !== undefined && !(Array.isArray(opts.urls) && opts.urls.length > 0 &&
      opts.urls.every((u) => typeof u === 'string'))) {
    fail('urls: expected a non-empty array of URLs');
  }
  if (opts.urls !== undefined && opts.url !== undefined) fail('url and urls: give one or the other');
  if (opts.port !== undefined && !(Number.isInteger(opts.port) && opts.port >= 0 && opts.port <= 65535)) {
    fail(`port: ${opts.port}; expected an integer from 0 to 65535`);
  }
  for (const name of ['dimensions', 'batchSize']) {
    if (opts[name] !== undefined && !(Number.isSafeInteger(opts[name]) && opts[name] > 0)) {
      fail(`${name}: ${opts[name]}; expected a positive integer`);
    }
  }
  for (const name of ['timeoutMs', 'healthTimeoutMs', 'startTimeoutMs', 'stopTimeoutMs']) {
    if (!(typeof opts[name] === 'number' && opts[name] > 0 && Number.isFinite(opts[name]))) {
      fail(`${name}: ${opts[name]}; expected a positive number of milliseconds`);
    }
  }
  for (const name of ['backoffMs', 'maxBackoffMs', 'retryTimeoutMs']) {
    if (!(typeof opts[name] === 'number' && opts[name] >= 0 && Number.isFinite(opts[name]))) {
      fail(`${name}: ${opts[name]}; expected a number of milliseconds >= 0`);
    }
  }
  if (opts.retries !== undefined && !(Number.isInteger(opts.retries) && opts.retries >= 0)) {
    fail(`retries: ${opts.retries}; expected an integer >= 0`);
  }
}

