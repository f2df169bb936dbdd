// The client: finds an embedserve server (or starts one), sends embedding requests to it
// over HTTP, restarts it after a crash, falls back to the JavaScript hash embedding when
// the policy allows, and stops the server it started when closed or when the program ends.
// Its behaviour follows the Python client (embedserve/client/); the README lists it.

import { EventEmitter } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import { EmbedServeError, validationError } from './errors.js';
import { Fallback } from './fallback.js';
import { modelEntry } from './info.js';
import {
  CROSS_ENCODER, EMBEDDINGS, byCosine, checkRerankArguments, kindOf, ranked, readRankings,
  rerankBodies,
} from './rerank.js';
import {
  RETRYABLE_STATUSES, RetryableStatus, TransportError, decodeFloat32Base64, errorFields, httpError,
  isRetryable,
  parseJson, readBody, redirectError, retryAfterMs,
} from './http.js';
import { isLoopback, resolveOptions } from './options.js';
import { ServerPool } from './pool.js';
import { ServerProcess } from './server-process.js';

// Bytes of a request body around its texts, with room to spare.
const BODY_OVERHEAD = 256;
// While a failure is this recent, calls go straight to the fallback (when allowed) and no
// new server is started: a dead server does not cost every call its retries.
const RECHECK_INTERVAL_MS = 2_000;
// A server that keeps dying is not restarted more often than this.
const MAX_RESTARTS = 5;
const RESTART_WINDOW_MS = 60_000;
// Spawns in one connect: more than one follows lost races for the port.
const MAX_SPAWNS_PER_START = 5;
// Times one request may find its server gone and re-find or restart it (not retries).
const MAX_RELOCATIONS = 2;
// Looks at a URL where nothing listens and no server may be started, when `retries` is unset.
const REFUSAL_RETRIES = 3;
// The shortest wait for an answer a retry gets, even at its deadline.
const MIN_WAIT_MS = 50;
// Model names whose last result's model is remembered (to tell when it changes).
const MAX_SEEN_MODELS = 64;

/**
 * Events (none is required; there is no 'error' event):
 * - 'serverSpawn' ({pid, command}): this client ran `python -m embedserve` (not ready yet)
 * - 'serverStart' ({pid, url, command}): a server this client started is ready
 * - 'serverExit' ({pid, code, signal, expected}): a server this client started exited
 * - 'connect' ({url, owned, info}): the client (re)connected to a ready server
 * - 'fallback' ({error, model}): a call was answered in-process because of `error`
 * - 'modelChange' ({from, to, source}): a result came from another model than the last one
 *   that asked for the same model (a call naming another model than the last is no news)
 * - 'log' (line, stream): a line printed by a server this client started
 */
export class EmbedServeClient extends EventEmitter {
  #options;
  /** Where to look for a server (and start one): parsed from url and port. */
  #target;
  /** Base URL of the server in use: the configured one, or a started server's ready URL. */
  #baseUrl;
  /** @type {ServerProcess | null} the server in use, when this client started it */
  #server = null;
  /** @type {Set<ServerProcess>} every server this client started that still runs */
  #owned = new Set();
  /** @type {ServerProcess | null} the server this client spawned last, ready or not */
  #lastSpawned = null;
  /** /info of the server in use; null: not connected (the next call connects). */
  #info = null;
  /** @type {Promise<void> | null} the connect in progress, shared by concurrent calls */
  #connecting = null;
  #closed = false;
  #closing = null;
  #hadServer = false;
  #restartTimes = [];
  #downUntil = 0;
  #downError = null;
  /** The in-process hash embedding, and what the server serves that it must match. */
  #fallback;
  /** @type {Map<string|null, string>} the model each name asked for (null: the default) last came from */
  #seenModels = new Map();
  /**
   * A server this client did not start went away: whoever runs it may be restarting it,
   * so a client that may not start one waits for it (once per loss).
   */
  #foreignLost = false;
  /** @type {ServerPool | null} several servers (the urls option): requests spread over them */
  #pool = null;

  /** The model, backend and source of the last result (null before the first). */
  lastModel = null;
  lastBackend = null;
  lastSource = null;

  /** @param {import('../index.js').EmbedServeOptions} [options] */
  constructor(options = {}) {
    super();
    const { options: resolved, target, targets, settings } = resolveOptions(options);
    this.#options = resolved;
    // EMBEDSERVE_DIMENSIONS, _BACKEND and _MODEL, parsed once at construction.
    this.#fallback = new Fallback(resolved, settings,
      targets.filter((t) => t.port !== '0').map((t) => t.base));
    this.#target = target;
    this.#baseUrl = target.base;
    if (targets.length > 1) {
      this.#pool = new ServerPool(targets, (failures, retryAfter) => this.#delay(failures, retryAfter));
      this.#baseUrl = this.#pool.url;
    }
  }

  /** Where the server in use answers (or will be looked for). */
  get url() {
    return this.#baseUrl;
  }

  /** Whether the server in use is one this client started (and will stop). */
  get ownsServer() {
    return this.#server !== null && this.#server.alive;
  }

  /** The server process in use: the one this client started, or the one /info names. */
  get serverPid() {
    if (this.ownsServer) return this.#server.pid;
    const pid = this.#info?.supervisor_pid ?? this.#info?.pid;
    return Number.isInteger(pid) ? pid : null;
  }

  /** The last output lines of the server this client started most recently. */
  get serverLog() {
    return this.#lastSpawned ? [...this.#lastSpawned.log] : [];
  }

  get closed() {
    return this.#closed;
  }

  /** Find or start the server now rather than on first use. Resolves to the client. */
  async connect() {
    this.#checkOpen();
    await this.#ensureConnected();
    return this;
  }

  /**
   * Embed `texts` (non-empty strings), in order. Resolves to an array of vectors (number
   * arrays) with three non-enumerable properties: `model` (the model that made every
   * vector in it), `backend` (the server's backend, e.g. 'hash') and `source` ('server',
   * or 'fallback' when the in-process hash embedding answered).
   * @param {string[]} texts
   * @param {{dimensions?: number, model?: string}} [options] `model`: the served model to
   *   use, by any name the server accepts for it (default: the `model` option when given,
   *   else the server's default); a name it does not serve is a `model_not_found` error.
   *   `dimensions`: shorter vectors where the model allows: the hash tier computes that
   *   many buckets directly (labelled with the served model's name, as the server does);
   *   ML models keep the first values, re-normalised
   */
  async embed(texts, { dimensions, model } = {}) {
    checkTexts(texts);
    if (dimensions !== undefined && !(Number.isSafeInteger(dimensions) && dimensions > 0)) {
      throw validationError(`'dimensions' must be a positive integer, got ${dimensions}`, 'dimensions');
    }
    if (model !== undefined && typeof model !== 'string') {
      throw new TypeError(`embed(): model must be a string, got ${describeType(model)}`);
    }
    if (model !== undefined && !model.trim()) {
      throw validationError("'model' must name a model, got an empty string", 'model');
    }
    this.#checkOpen();
    if (texts.length === 0) return tagged([], null, null, null);

    let result;
    if (this.#options.fallback !== 'never' && Date.now() < this.#downUntil) {
      // Failed moments ago: do not pay for retries and start attempts on every call.
      result = this.#embedFallback(texts, dimensions, this.#downError, model);
    } else {
      try {
        result = await this.#embedRemote(texts, dimensions, model);
      } catch (error) {
        if (!(error instanceof EmbedServeError) || !error.serverUnavailable) throw error;
        this.#checkOpen();
        this.#downUntil = Date.now() + RECHECK_INTERVAL_MS;
        this.#downError = error;
        result = this.#embedFallback(texts, dimensions, error, model);
      }
    }
    this.#note(result, model);
    return result;
  }

  /**
   * Embed one text. Resolves to one vector with the same `model`, `backend` and `source`.
   * @param {string} text
   * @param {{dimensions?: number, model?: string}} [options]
   */
  async embedSingle(text, options) {
    if (typeof text !== 'string') {
      throw new TypeError(`embedSingle() takes one string, got ${describeType(text)}`);
    }
    const vectors = await this.embed([text], options);
    return tagged(vectors[0], vectors.model, vectors.backend, vectors.source);
  }

  /**
   * Rank `documents` (non-empty strings) by relevance to `query`, best first, at most
   * `topN`. Resolves to an array of {index, score, document} with non-enumerable `model`,
   * `backend`, `method` ('cross-encoder', or 'embeddings': cosine similarity of an
   * embedding model's vectors) and `source`. `model`: a served reranker or embedding model
   * (default: the server's first reranker, else its default model). The fallback ranks by
   * hash embeddings under embed's same-model rule, never in place of a server's reranker.
   * @param {string} query
   * @param {string[]} documents
   * @param {{topN?: number, model?: string}} [options]
   */
  async rerank(query, documents, { topN, model } = {}) {
    checkRerankArguments(query, documents, topN, model);
    this.#checkOpen();
    let result;
    if (this.#options.fallback !== 'never' && Date.now() < this.#downUntil) {
      result = this.#rerankFallback(query, documents, topN, this.#downError, model);
    } else {
      try {
        result = await this.#rerankRemote(query, documents, topN, model);
      } catch (error) {
        if (!(error instanceof EmbedServeError) || !error.serverUnavailable) throw error;
        this.#checkOpen();
        this.#downUntil = Date.now() + RECHECK_INTERVAL_MS;
        this.#downError = error;
        result = this.#rerankFallback(query, documents, topN, error, model);
      }
    }
    this.lastModel = result.model;
    this.lastBackend = result.backend;
    this.lastSource = result.source;
    return result;
  }

  async #rerankRemote(query, documents, topN, asked) {
    await this.#ensureConnected(asked); // the document limit comes from /info
    const sent = asked === undefined ? undefined : this.#fallback.requestName(asked);
    let info = this.#info;
    let model = '';
    const rankings = [];
    for (const [first, body] of rerankBodies(query, documents, info, sent)) {
      let answer;
      [answer, info] = await this.#post('/v2/rerank', body, first, asked, asked);
      const chunk = readRankings(answer, first, body, documents, (what) => this.#badResponse(what));
      model = answer.model;
      rankings.push(...chunk);
    }
    const method = kindOf(info, model) === 'reranker' ? CROSS_ENCODER : EMBEDDINGS;
    return ranked(rankings, topN, model, backendOf(info, model), method, 'server');
  }

  #rerankFallback(query, documents, topN, cause, model) {
    const { embedder, label, refusal } = this.#fallback.rerankPlan(model);
    if (!embedder) {
      const { name: _name, ...details } = cause;
      throw new EmbedServeError(`${cause.message}; no fallback: ${refusal}`,
        { ...details, cause: cause.cause });
    }
    // Doubles, as the server's hash tier reranks with them.
    const vectors = embedder.embed([query, ...documents]);
    this.emit('fallback', { error: cause, model: label });
    return ranked(byCosine(vectors, documents), topN, label, 'hash', EMBEDDINGS, 'fallback');
  }

  /**
   * One GET /health to the server in use (or to the configured URL), without starting a
   * server or retrying. Never throws: resolves to {ok, status, url, owned, error?}, where
   * status is 'ok', the server's reason for 503 ('loading', 'draining'), 'unreachable',
   * 'not_embedserve' or 'closed'.
   */
  async health() {
    const url = this.#baseUrl;
    const owned = this.ownsServer;
    if (this.#closed) return { ok: false, status: 'closed', url, owned };
    if (this.#target.port === '0' && !this.#info) {
      return { ok: false, status: 'unreachable', url, owned, error: 'no server started yet (port 0 starts one on first use)' };
    }
    // With several servers, each until one serves (the one picked last first).
    const last = this.#pool?.last.base;
    const bases = this.#pool ? [last, ...this.#pool.bases.filter((base) => base !== last)] : [url];
    let probe;
    for (const base of bases) {
      probe = await this.#probe(base);
      if (probe.state === 'ready') break;
    }
    const result = { ok: probe.state === 'ready', status: probe.status, url, owned };
    if (probe.detail) result.error = probe.detail;
    return result;
  }

  /** The server's GET /info (starting a server if allowed). */
  async info() {
    this.#checkOpen();
    const [info] = await this.#request('GET', '/info');
    this.#setInfo(info);
    return info;
  }

  /**
   * The names of the models the server serves (GET /v1/models), in its order: the first
   * is its default, which calls that name no model get. Starts a server if allowed; the
   * fallback does not answer this.
   */
  async models() {
    this.#checkOpen();
    const [answer] = await this.#request('GET', '/v1/models');
    return this.#modelIds(answer);
  }

  /**
   * Stop the server this client started (SIGTERM; SIGKILL after stopTimeoutMs) and refuse
   * further calls. A server this client did not start is left running. Idempotent.
   */
  close() {
    this.#closed = true;
    this.#closing ??= (async () => {
      this.#info = null;
      await Promise.all([...this.#owned].map((server) => server.stop(this.#options.stopTimeoutMs)));
    })();
    return this.#closing;
  }

  async [Symbol.asyncDispose ?? Symbol.for('nodejs.asyncDispose')]() {
    await this.close();
  }

  // -- embedding ------------------------------------------------------------------------

  /** The call's vectors from the server; `asked`: the model the call named, if any. */
  async #embedRemote(texts, dimensions, asked) {
    for (let attempt = 0; attempt < 2; attempt++) {
      // A server replaced by another model mid-call: embed the whole call again, once.
      const result = await this.#embedOnce(texts, dimensions, asked);
      if (result) return result;
    }
    throw new EmbedServeError('the server changed models twice during one call',
      { code: 'model_changed', url: this.#baseUrl });
  }

  /** The call's vectors from the server, or null when its model changed mid-call. */
  /** POST through #request; a model the server does not have is named in the error
   *  (`wanted`: the model asked for, or the client's default). */
  async #post(path, body, first, asked, wanted) {
    try {
      return await this.#request('POST', path, body, first, asked);
    } catch (error) {
      if (error instanceof EmbedServeError && error.code === 'model_not_found') {
        await this.#nameMissingModel(error, wanted);
      }
      throw error;
    }
  }

  async #embedOnce(texts, dimensions, asked) {
    await this.#ensureConnected(asked); // the chunk limits come from /info
    // Every chunk asks for the same model: one call's vectors come from one model.
    const wanted = asked ?? this.#options.model;
    const vectors = [];
    let model = null;
    let info = this.#info;
    for (const [first, chunk] of this.#chunks(texts, wanted)) {
      const body = { input: chunk, encoding_format: this.#options.encodingFormat };
      if (dimensions !== undefined) body.dimensions = dimensions;
      if (wanted !== undefined) body.model = this.#fallback.requestName(wanted);
      let answer;
      [answer, info] = await this.#post('/v1/embeddings', body, first, asked, wanted);
      const chunkVectors = this.#decode(answer, chunk.length, dimensions, info);
      if (model !== null && answer.model !== model) {
        this.emit('modelChange', { from: model, to: answer.model, source: 'server' });
        return null;
      }
      model = answer.model;
      for (const vector of chunkVectors) vectors.push(vector);
    }
    // One size for all, the one asked for if any: a call never mixes vectors of two models.
    const sizes = new Set(vectors.map((vector) => vector.length));
    if (sizes.size > 1 || (dimensions !== undefined && !sizes.has(dimensions))) {
      throw this.#badResponse(`vectors of ${[...sizes].sort((a, b) => a - b).join(', ')} values`
        + (dimensions !== undefined ? `, not ${dimensions}` : ''));
    }
    if (asked === undefined) this.#fallback.servedModel = model; // the default's (or the option's)
    return tagged(vectors, model, backendOf(info, model), 'server');
  }

  /**
   * Completes a model_not_found error: the name asked for, and the served names (one GET
   * /v1/models, not retried: the error comes at once; the server's message lists them too).
   */
  async #nameMissingModel(error, asked) {
    error.model = asked;
    try {
      error.available = this.#modelIds(await this.#fetchJson('GET', '/v1/models', undefined, this.#options.timeoutMs));
    } catch {
      // The server's message names them anyway.
    }
  }

  #modelIds(answer) {
    const ids = Array.isArray(answer?.data) ? answer.data.map((item) => item?.id) : null;
    if (!ids || !ids.every((id) => typeof id === 'string')) {
      throw this.#badResponse('GET /v1/models did not list model ids');
    }
    return ids;
  }

  /** [index of the first text, texts] per request, within the server's /info limits. */
  *#chunks(texts, model) {
    const info = this.#info ?? {};
    let maxCount = positiveInteger(info.max_batch_size) ?? 2048;
    if (this.#options.batchSize) maxCount = Math.min(maxCount, this.#options.batchSize);
    const maxBody = positiveInteger(info.max_body_bytes) ?? 8 * 1024 * 1024;
    // The model's name travels in every body too.
    const budget = maxBody - BODY_OVERHEAD - (model === undefined ? 0 : Buffer.byteLength(JSON.stringify(model)));
    let start = 0;
    let bytes = 2;
    for (let i = 0; i < texts.length; i++) {
      const size = Buffer.byteLength(JSON.stringify(texts[i])) + 1;
      if (size + 2 > budget) {
        throw validationError(`texts[${i}] is ${size - 1} bytes as JSON; the server takes ` +
          `request bodies up to ${maxBody} bytes`, 'input', 413);
      }
      if (i > start && (i - start >= maxCount || bytes + size > budget)) {
        yield [start, texts.slice(start, i)];
        start = i;
        bytes = 2;
      }
      bytes += size;
    }
    yield [start, texts.slice(start)];
  }

  /**
   * The vectors of one answer (one request), checked: exactly one per text the request
   * sent, each an array of finite numbers (or base64 of finite float32 values), all of one
   * size, not empty, and of the size asked for (`dimensions`), else, when the answer's
   * model is the one `info` (the answering server's /info) describes, of its size. A
   * vector that breaks any of these is no embedding; bad_response rather than results.
   */
  #decode(answer, expected, dimensions, info) {
    const data = answer?.data;
    if (!Array.isArray(data) || typeof answer.model !== 'string') {
      throw this.#badResponse(`expected ${expected} embeddings and a model name`);
    }
    if (data.length !== expected) {
      throw this.#badResponse(`${data.length} embeddings for the ${expected} texts of one request`);
    }
    const vectors = new Array(expected);
    for (const item of data) {
      const index = item?.index;
      if (!Number.isInteger(index) || index < 0 || index >= expected || vectors[index]) {
        throw this.#badResponse(`bad or repeated index ${index}`);
      }
      const embedding = item.embedding;
      if (typeof embedding === 'string') {
        vectors[index] = decodeFloat32Base64(embedding, this.#baseUrl);
      } else if (Array.isArray(embedding)) {
        // typeof: JSON's strings, booleans and null are no values; isFinite: nor is the
        // Infinity that JSON.parse makes of a number too large for a double (1e999).
        if (!embedding.every((value) => typeof value === 'number' && Number.isFinite(value))) {
          throw this.#badResponse(`embedding ${index} holds a value that is not a finite number`);
        }
        vectors[index] = embedding;
      } else {
        throw this.#badResponse(`embedding ${index} is neither base64 nor an array`);
      }
    }
    const sizes = [...new Set(vectors.map((vector) => vector.length))].sort((a, b) => a - b);
    if (sizes.length > 1) throw this.#badResponse(`vectors of ${sizes.join(', ')} values`);
    const [size] = sizes;
    if (size === 0) throw this.#badResponse('empty vectors');
    if (dimensions !== undefined) {
      if (size !== dimensions) throw this.#badResponse(`vectors of ${size} values, not ${dimensions}`);
    } else {
      const described = modelEntry(info, answer.model)?.dimensions;
      if (positiveInteger(described) && size !== described) {
        throw this.#badResponse(`vectors of ${size} values, not the ${described} that /info gives ${answer.model}`);
      }
    }
    return vectors;
  }

  #badResponse(what) {
    return new EmbedServeError(`unexpected answer from ${this.#baseUrl}: ${what}`,
      { code: 'bad_response', url: this.#baseUrl });
  }

  #note(result, asked) {
    // A call naming another model than the last gets another model: no news. The same
    // request answered by another model is (a server swapped, a fallback).
    const key = asked === undefined ? null : asked.toLowerCase();
    const previous = this.#seenModels.get(key);
    if (previous !== undefined && result.model !== previous) {
      this.emit('modelChange', { from: previous, to: result.model, source: result.source });
    }
    this.#seenModels.delete(key);
    this.#seenModels.set(key, result.model);
    if (this.#seenModels.size > MAX_SEEN_MODELS) this.#seenModels.delete(this.#seenModels.keys().next().value);
    this.lastModel = result.model;
    this.lastBackend = result.backend;
    this.lastSource = result.source;
  }

  // -- fallback -------------------------------------------------------------------------

  #embedFallback(texts, dimensions, cause, model) {
    const { embedder, label, refusal } = this.#fallback.plan(model);
    if (!embedder) {
      // The same error, saying why nothing else was tried.
      const { name: _name, ...details } = cause;
      throw new EmbedServeError(`${cause.message}; no fallback: ${refusal}`,
        { ...details, cause: cause.cause });
    }
    const vectors = this.#fallback.embed(embedder, texts, dimensions);
    this.emit('fallback', { error: cause, model: label });
    return tagged(vectors, label, 'hash', 'fallback');
  }

  // -- requests with retries ------------------------------------------------------------

  /**
   * One API call: connects first (starting a server if allowed); a server found gone is
   * re-found or restarted at once (not a retry); connection errors, timeouts and 408,
   * 429, 502, 503, 504 are retried with exponential backoff and jitter, honouring
   * Retry-After, until retryTimeoutMs after the first attempt (a worker that restarts
   * answers 503 loading while its model loads). Other errors are raised at once.
   * @returns {Promise<[any, object]>} the answer, and the /info of the server that gave it
   */
  async #request(method, path, body, first = 0, model = undefined) {
    if (this.#pool) {
      await this.#ensureConnected(model);
      const info = this.#info;
      return [await this.#poolRequest(method, path, body, first), info];
    }
    const { timeoutMs, retryTimeoutMs, retries } = this.#options;
    const started = Date.now();
    const deadline = started + retryTimeoutMs;
    let failures = 0;
    let relocations = 0;
    for (;;) {
      let info = null;
      let server = null;
      let failure;
      // The first attempt waits timeoutMs for its answer; a retry no later than the
      // deadline, so that one request ends within max(timeoutMs, retryTimeoutMs).
      const wait = failures === 0 ? timeoutMs
        : Math.min(timeoutMs, Math.max(deadline - Date.now(), MIN_WAIT_MS));
      try {
        // Inside the try: finding the server again can meet the same failures (its /info
        // answered 503, or the connection was reset), and they are retried the same way.
        await this.#ensureConnected(model);
        info = this.#info;
        server = this.#server;
        return [await this.#fetchJson(method, path, body, wait), info];
      } catch (error) {
        this.#checkOpen();
        if (!(error instanceof TransportError) && !(error instanceof RetryableStatus)) {
          throw annotateChunk(error, first);
        }
        failure = error;
      }
      const gone = info !== null && failure instanceof TransportError &&
        (failure.refused || (server !== null && this.#server === server && !server.alive));
      if (gone && relocations < MAX_RELOCATIONS) {
        // Nothing listens any more (or our server died): find or start one now, no backoff.
        if (server === null) this.#foreignLost = true;
        this.#lose(info);
        relocations++;
        continue;
      }
      const now = Date.now();
      if (now >= deadline || (retries !== undefined && failures >= retries)) {
        const timedOut = failure instanceof TransportError && failure.timedOut;
        throw new EmbedServeError(
          `${method} ${this.#baseUrl}${path} failed ${failures + 1} times in ` +
            `${((now - started) / 1000).toFixed(1)} s; last: ${failure.message}`,
          { code: timedOut ? 'timeout' : 'unavailable', url: this.#baseUrl, status: failure.status,
            serverMessage: failure.serverMessage, cause: failure.cause ?? failure },
        );
      }
      failures++;
      // Not past the deadline: a last try at the deadline beats giving up early.
      await sleep(Math.min(this.#delay(failures, failure.retryAfterMs), deadline - now));
    }
  }

  /**
   * #request with several servers (see pool.js): each try goes to the pool's pick; one
   * that fails backs off and another takes the request at once (not a retry); only when
   * all back off does the request wait, as with one server, until retryTimeoutMs.
   */
  async #poolRequest(method, path, body, first = 0) {
    const { timeoutMs, retryTimeoutMs, retries } = this.#options;
    const pool = this.#pool;
    const started = Date.now();
    const deadline = started + retryTimeoutMs;
    let failures = 0;
    let skips = 0;
    for (;;) {
      this.#checkOpen();
      const member = pool.pick();
      const wait = failures === 0 ? timeoutMs
        : Math.min(timeoutMs, Math.max(deadline - Date.now(), MIN_WAIT_MS));
      let failure;
      try {
        const answer = await this.#fetchJson(method, path, body, wait, member.base);
        pool.served(member);
        return answer;
      } catch (error) {
        this.#checkOpen();
        if (!(error instanceof TransportError) && !(error instanceof RetryableStatus)) {
          pool.served(member); // it answers: the request's error, not the server's
          throw annotateChunk(error, first);
        }
        failure = error;
      } finally {
        pool.release(member);
      }
      if (pool.skip(member, failure.retryAfterMs) && skips < pool.size) {
        skips++;
        continue;
      }
      const now = Date.now();
      if (now >= deadline || (retries !== undefined && failures >= retries)) {
        const timedOut = failure instanceof TransportError && failure.timedOut;
        throw new EmbedServeError(
          `${method} ${path} failed ${failures + 1} times in ${((now - started) / 1000).toFixed(1)} s ` +
            `on every server of ${pool.url}; last: ${failure.message}`,
          { code: timedOut ? 'timeout' : 'unavailable', url: pool.url, status: failure.status,
            serverMessage: failure.serverMessage, cause: failure.cause ?? failure },
        );
      }
      failures++;
      await sleep(Math.min(this.#delay(failures, failure.retryAfterMs), deadline - now));
    }
  }

  #delay(failures, retryAfter) {
    const { backoffMs, maxBackoffMs } = this.#options;
    // retryAfterMs() gives only positive waits; checked again here because a zero or
    // negative one would mean no delay at all: requests as fast as the server answers.
    if (retryAfter !== undefined && retryAfter > 0) {
      const base = Math.min(retryAfter, maxBackoffMs);
      return base + Math.random() * 0.1 * base;
    }
    const ceiling = Math.min(maxBackoffMs, backoffMs * 2 ** (failures - 1));
    // "Equal jitter": never zero (no hammering), spread out (no thundering herd).
    return ceiling / 2 + Math.random() * (ceiling / 2);
  }

  /**
   * GET or POST JSON. Resolves to the parsed answer of a 2xx; rejects with a
   * TransportError (no answer), a RetryableStatus (408/429/502/503/504) or an
   * EmbedServeError (any other status, or not JSON).
   */
  async #fetchJson(method, path, body, timeoutMs, baseUrl = this.#pool ? this.#pool.last.base : this.#baseUrl) {
    const url = baseUrl + path;
    const headers = { accept: 'application/json' };
    if (body !== undefined) headers['content-type'] = 'application/json';
    if (this.#options.apiKey) headers.authorization = `Bearer ${this.#options.apiKey}`;
    let response;
    let text;
    try {
      response = await fetch(url, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(timeoutMs),
        // Not followed: a redirect would take the request (and the API key) elsewhere.
        redirect: 'manual',
      });
      if (response.status >= 300 && response.status < 400) throw redirectError(method, url, response);
      text = await readBody(response, url);
    } catch (cause) {
      if (cause instanceof EmbedServeError) throw cause; // a redirect, a body over the limit
      throw new TransportError(cause, url, timeoutMs);
    }
    const json = parseJson(text);
    if (response.status >= 400) {
      const fields = errorFields(json, text, response.statusText);
      if (isRetryable(response.status, json)) {
        throw new RetryableStatus(response.status, fields.message, retryAfterMs(response.headers));
      }
      throw httpError(response.status, fields, url);
    }
    if (json === undefined) {
      throw new EmbedServeError(`${method} ${url} answered ${response.status} without JSON`,
        { code: 'bad_response', url, status: response.status });
    }
    return json;
  }

  // -- finding, starting, restarting the server ------------------------------------------

  #checkOpen() {
    if (this.#closed) throw closedError();
  }

  #setInfo(info, url = this.#pool ? this.#pool.last.base : this.#baseUrl) {
    if (typeof info !== 'object' || info === null || typeof info.model !== 'string') {
      throw this.#badResponse('GET /info did not describe a model');
    }
    this.#info = info;
    this.#fallback.learn(info, url);
  }

  /** The server behind `info` stopped answering: forget it (once, whoever sees it first). */
  #lose(info) {
    if (this.#info === info) this.#info = null;
  }

  /** `model`: the one the call asks for, which says whether a fallback could answer it. */
  async #ensureConnected(model) {
    this.#checkOpen();
    if (this.#info) return;
    this.#connecting ??= this.#findOrStart(model).finally(() => {
      this.#connecting = null;
    });
    try {
      await this.#connecting;
    } catch (error) {
      throw this.#closed ? closedError(error) : error;
    }
  }

  async #findOrStart(model) {
    if (this.#pool) { // several servers: nothing to start; /info from whichever answers
      this.#setInfo(await this.#poolRequest('GET', '/info'), this.#pool.last.base);
      this.#hadServer = true;
      this.emit('connect', { url: this.#pool.last.base, owned: false, info: this.#info });
      return;
    }
    const target = this.#target;
    const recentlyFailed = Date.now() < this.#downUntil && this.#downError !== null;
    const mayStart = this.#options.autoStart && (this.#options.restart || !this.#hadServer) &&
      !recentlyFailed;
    // Waiting for a server that is there but not answering yet (loading, or hung): as long
    // as for a server being started when this client may start one, else as long as for
    // any request (a client that starts nothing ends within retryTimeoutMs).
    const patience = mayStart ? this.#options.startTimeoutMs : this.#options.retryTimeoutMs;
    const deadline = Date.now() + patience;
    const local = isLoopback(target.hostname) && target.protocol === 'http:';
    if (target.port === '0') {
      if (!mayStart) {
        throw new EmbedServeError(`the private server (port 0) is gone and ${this.#whyNoStart(local)}`,
          { code: 'unreachable', url: target.base });
      }
      await this.#startServer(deadline);
      return;
    }
    let spawns = 0;
    let refusals = 0;
    const started = Date.now();
    // A server someone else runs went away: they may be restarting it; wait for it as long
    // as for any other restart, unless the fallback's identical vectors can answer
    // meanwhile. Otherwise (nothing was ever there, or waiting for it already failed once)
    // look a few times only: the fallback or the error is better than a minute's wait for
    // a server that is not coming.
    const waitUntil = this.#foreignLost && !this.#fallback.plan(model).embedder
      ? started + this.#options.retryTimeoutMs : null;
    for (;;) {
      this.#checkOpen();
      const probe = await this.#probeUntilSettled(target.base, deadline);
      if (probe.state === 'ready') {
        this.#foreignLost = false;
        this.#baseUrl = target.base;
        this.#server = null;
        this.#setInfo(await this.#fetchJson('GET', '/info', undefined, this.#options.timeoutMs, target.base), target.base);
        this.#hadServer = true;
        this.emit('connect', { url: target.base, owned: false, info: this.#info });
        return;
      }
      if (probe.state === 'foreign') {
        if (probe.error?.code === 'http_error') throw probe.error; // a redirect: the URL is wrong
        throw new EmbedServeError(
          `something that is not an embedserve server answers at ${target.base}: ${probe.detail}`,
          { code: 'not_embedserve', url: target.base });
      }
      if (probe.state === 'busy') { // still busy at the deadline
        throw new EmbedServeError(
          `the server at ${target.base} did not become ready within ` +
            `${patience} ms (${probe.detail})`,
          { code: 'start_timeout', url: target.base });
      }
      // 'down': nothing listens.
      if (!(mayStart && local)) {
        const now = Date.now();
        const { retries } = this.#options;
        const again = waitUntil === null ? refusals < (retries ?? REFUSAL_RETRIES)
          : now < waitUntil && (retries === undefined || refusals < retries);
        if (again) { // someone else may be starting it right now
          refusals++;
          const delay = this.#delay(refusals);
          await sleep(waitUntil === null ? delay : Math.min(delay, waitUntil - now));
          continue;
        }
        this.#foreignLost = false;
        throw new EmbedServeError(
          `no embedserve server answers at ${target.base} (${probe.detail}; ${refusals + 1} ` +
            `tries in ${((now - started) / 1000).toFixed(1)} s), and ${this.#whyNoStart(local)}`,
          { code: 'unreachable', url: target.base, cause: probe.error });
      }
      if (spawns >= MAX_SPAWNS_PER_START) {
        throw new EmbedServeError(
          `could not start a server at ${target.base}: its port stays taken, yet nothing answers there`,
          { code: 'start_failed', url: target.base });
      }
      spawns++;
      if (await this.#startServer(deadline)) return;
      // Another process bound the port first (a client starting a server at the same
      // time, or a server still letting go of it): use that one once it answers.
    }
  }

  #whyNoStart(local) {
    if (!this.#options.autoStart) return 'autoStart is off';
    if (!this.#options.restart && this.#hadServer) return 'restart is off';
    if (!local) {
      return 'a server is only started for http:// on this machine (127.0.0.1, localhost, ::1)';
    }
    return `a start failed less than ${RECHECK_INTERVAL_MS} ms ago: ${this.#downError?.message}`;
  }

  /**
   * Spawn `python -m embedserve` for the configured host and port and wait for its ready
   * line. Resolves true when it serves; false when its port was taken (the caller then
   * waits for whoever holds it). Other failures reject, quoting the server's last lines.
   */
  async #startServer(deadline) {
    this.#countRestart();
    const target = this.#target;
    const host = target.hostname.replace(/^\[|\]$/g, '');
    const { python, backend, model, dimensions, serverArgs, cwd, apiKey } = this.#options;
    const args = ['-m', 'embedserve', '--host', host === 'localhost' ? '127.0.0.1' : host,
      '--port', target.port];
    if (backend) args.push('--backend', backend);
    if (model) args.push('--model', model);
    if (dimensions) args.push('--dimensions', String(dimensions));
    args.push(...serverArgs);
    const env = {
      ...process.env,
      PYTHONUNBUFFERED: '1',
      // Stop when this process is gone, however it went, even by kill -9 (servers that
      // support it read this; an EMBEDSERVE_* variable a server does not know is ignored).
      EMBEDSERVE_WATCH_STDIN: '1',
      ...this.#options.env,
    };
    // Through the environment, not argv: argv is visible to every user in `ps`.
    if (apiKey) env.EMBEDSERVE_API_KEY = apiKey;

    const server = new ServerProcess({ python, args, env, cwd });
    server.on('log', (line, stream) => this.emit('log', line, stream));
    server.once('exit', (code, signal) => {
      this.#owned.delete(server);
      if (!server.url) return; // never became ready: start() reports that
      this.emit('serverExit', { pid: server.pid, code, signal, expected: this.#closed });
      // Crashed, or stopped by someone else: the next call finds or starts another.
      if (this.#server === server) this.#info = null;
    });
    this.#owned.add(server);
    this.#lastSpawned = server;
    let url;
    try {
      const ready = server.start(deadline);
      if (server.pid !== undefined) this.emit('serverSpawn', { pid: server.pid, command: server.command });
      url = await ready;
    } catch (error) {
      await server.stop(this.#options.stopTimeoutMs); // reap it and anything it left
      if (this.#closed) throw closedError(error);
      if (error.addressInUse && target.port !== '0') return false;
      throw error;
    }
    this.#server = server;
    this.#baseUrl = target.port === '0' ? url.replace(/\/+$/, '') + target.path : target.base;
    this.#setInfo(await this.#fetchJson('GET', '/info', undefined, this.#options.timeoutMs));
    this.#hadServer = true;
    this.#downUntil = 0;
    this.emit('serverStart', { pid: server.pid, url: this.#baseUrl, command: server.command });
    this.emit('connect', { url: this.#baseUrl, owned: true, info: this.#info });
    return true;
  }

  #countRestart() {
    if (!this.#hadServer) return;
    const now = Date.now();
    this.#restartTimes = this.#restartTimes.filter((t) => now - t <= RESTART_WINDOW_MS);
    if (this.#restartTimes.length >= MAX_RESTARTS) {
      throw new EmbedServeError(
        `the server at ${this.#target.base} went away ${MAX_RESTARTS} times in ` +
          `${RESTART_WINDOW_MS / 1000} s; not restarting it again yet`,
        { code: 'unavailable', url: this.#target.base });
    }
    this.#restartTimes.push(now);
  }

  /** Probe until the answer is ready, down or foreign, or until the deadline (busy). */
  async #probeUntilSettled(base, deadline) {
    let delay = 20;
    for (;;) {
      const probe = await this.#probe(base);
      if (probe.state !== 'busy' || Date.now() + delay > deadline) return probe;
      await sleep(delay);
      delay = Math.min(delay * 2, 250);
    }
  }

  /**
   * One GET /health. state: 'ready' (200 {"status":"ok"}); 'busy' (503 loading/draining,
   * another retryable status, or a socket that accepts but does not answer in time);
   * 'down' (nothing listens: connection refused, unknown host); 'foreign' (an answer that
   * is not embedserve's).
   */
  async #probe(base) {
    const url = `${base}/health`;
    let response;
    let body;
    try {
      response = await fetch(url, { signal: AbortSignal.timeout(this.#options.healthTimeoutMs), redirect: 'manual' });
      if (response.status >= 300 && response.status < 400) throw redirectError('GET', url, response);
      body = await readBody(response, url);
    } catch (cause) {
      if (cause instanceof EmbedServeError) { // a redirect, a body over the limit
        return { state: 'foreign', status: 'not_embedserve', detail: cause.message, error: cause };
      }
      const error = new TransportError(cause, url, this.#options.healthTimeoutMs);
      if (error.notHttp) {
        // An answer that is not HTTP at all: another kind of server holds the port, and
        // waiting (as for one still starting) would not change that.
        return { state: 'foreign', status: 'not_embedserve', detail: error.message, error };
      }
      const down = error.refused || !isLoopback(this.#target.hostname);
      return { state: down ? 'down' : 'busy', status: 'unreachable', detail: error.message, error };
    }
    const json = parseJson(body);
    if (response.status === 200 && json?.status === 'ok') return { state: 'ready', status: 'ok' };
    const { message } = errorFields(json, body, response.statusText);
    if (RETRYABLE_STATUSES.has(response.status)) {
      return { state: 'busy', status: message, detail: `GET /health answered ${response.status}: ${message}` };
    }
    return {
      state: 'foreign',
      status: 'not_embedserve',
      detail: `GET ${url} answered ${response.status}: ${message.slice(0, 200)}`,
    };
  }
}

/** The same client under the name of the embedder it replaces. */
export const NomicEmbedder = EmbedServeClient;

// -- helpers --------------------------------------------------------------------------------

function tagged(value, model, backend, source) {
  Object.defineProperties(value, {
    model: { value: model, enumerable: false },
    backend: { value: backend, enumerable: false },
    source: { value: source, enumerable: false },
  });
  return value;
}

/**
 * The backend of the served model whose answers carry the name `model`: a server of several
 * lists each one's names and backend in its /info `models`; else the server's.
 */
function backendOf(info, model) {
  return (modelEntry(info, model) ?? info)?.backend ?? null;
}

function checkTexts(texts) {
  if (!Array.isArray(texts)) {
    throw new TypeError(`embed() takes an array of strings, got ${describeType(texts)}; ` +
      'for one text use embedSingle(text)');
  }
  texts.forEach((text, i) => {
    if (typeof text !== 'string') {
      throw new TypeError(`embed(): texts[${i}] must be a string, got ${describeType(text)}`);
    }
    // The server rejects it too; caught here so that the fallback agrees with it.
    if (text === '') throw validationError(`texts[${i}] is an empty string`, 'input');
  });
}

function describeType(value) {
  return value === null ? 'null' : Array.isArray(value) ? 'an array' : typeof value;
}

function annotateChunk(error, first) {
  if (first > 0 && error instanceof EmbedServeError && error.code === 'validation') {
    // The server's indexes ("input[3]") count within one request; say where it began.
    error.message += ` (in the request for texts[${first}:])`;
    error.inputOffset = first;
  }
  return error;
}

function closedError(cause) {
  return new EmbedServeError('this embedserve client is closed', { code: 'closed', cause });
}

function positiveInteger(value) {
  return Number.isSafeInteger(value) && value > 0 ? value : undefined;
}