// Type declarations for embedserve's Node.js client (index.js).

import { EventEmitter } from 'node:events';

/** Where a result came from: the server, or the in-process hash embedding. */
export type Source = 'server' | 'fallback';

/**
 * When the in-process hash embedding may answer in place of an unavailable server:
 * - 'same-model' (default; also `true`): only when its model is the one the server would
 *   have used (the model the server last answered with; before that, the one the options
 *   ask for: backend 'hash' yes, an ML backend or model no; nothing said: the one the
 *   server at that URL last said it serves, to this or an earlier process, kept in
 *   served-models.json; nothing known at all: yes).
 * - 'always': whatever the server's model was (check `result.model`).
 * - 'never' (also `false`): raise the error.
 * A call that names its model (`embed(texts, { model })`) is answered in-process only when
 * that name is the hash tier's ('hash', 'hash-v1-<D>', or a name the server gave it), under
 * either of the first two policies; never for another model.
 */
export type FallbackPolicy = 'same-model' | 'always' | 'never';

export interface EmbedServeOptions {
  /**
   * The server's base URL. Default: $EMBEDSERVE_URL, else http://127.0.0.1:8765. Several
   * comma-separated URLs (here or in $EMBEDSERVE_URL) act as `urls`.
   */
  url?: string;
  /**
   * Several servers that serve alike (replicas): each request goes to the healthy one with
   * the fewest requests in flight; one that fails is skipped for a back-off while the
   * others serve. No server is ever started for them (autoStart is off). Not with `url`.
   */
  urls?: string[];
  /** Overrides the URL's port; 0 starts a private server on a free port every time. */
  port?: number;
  /** Start `python -m embedserve` when nothing answers (http:// on this machine only). Default true. */
  autoStart?: boolean;
  /** Start a new server when the one in use went away. Default true. */
  restart?: boolean;
  /** --backend of a started server ('auto', 'hash', 'sentence-transformers', 'transformers'). */
  backend?: string;
  /**
   * --model of a started server; also the model every call asks for (the request's `model`
   * field) unless the call names its own.
   */
  model?: string;
  /** --dimensions of a started server (hash backend), and the fallback's size. */
  dimensions?: number;
  /** More command-line arguments for a started server. */
  serverArgs?: string[];
  /** Environment variables for a started server, over this process's own. */
  env?: Record<string, string>;
  /** Working directory of a started server. */
  cwd?: string;
  /** Python executable that runs the server. Default: $EMBEDSERVE_PYTHON, else 'python3'. */
  python?: string;
  /** Bearer token for the server (default $EMBEDSERVE_API_KEY); also given to a started server. */
  apiKey?: string;
  /** Vector transport: 'base64' (float32, compact; default) or 'float' (JSON doubles). */
  encodingFormat?: 'base64' | 'float';
  /** Most texts per request; the server's /info max_batch_size caps it anyway. */
  batchSize?: number;
  /** Wait for one response at most this long (ms). Default 60000. */
  timeoutMs?: number;
  /** Wait for one GET /health at most this long (ms). Default 2000. */
  healthTimeoutMs?: number;
  /** From starting a server to its ready line (ms). Default 60000. */
  startTimeoutMs?: number;
  /** From SIGTERM to SIGKILL when stopping a server this client started (ms). Default 10000. */
  stopTimeoutMs?: number;
  /**
   * How long one request keeps being retried (connection errors, timeouts, 408/429/502/503/504,
   * honouring Retry-After) before the call fails or falls back (ms). Long enough by default for
   * a restarted worker to load its model (it answers 503 loading meanwhile). 0: no retries.
   * Default 60000.
   */
  retryTimeoutMs?: number;
  /**
   * Also cap the number of retries of one request (default: unset, only retryTimeoutMs bounds
   * them); and how often to look again where nothing listens and no server may be started
   * (default 3).
   */
  retries?: number;
  /** First retry delay (ms), doubled each retry, with jitter. Default 100. */
  backoffMs?: number;
  /** Longest retry delay (ms), Retry-After included. Default 2000. */
  maxBackoffMs?: number;
  /** See FallbackPolicy. Default 'same-model'. */
  fallback?: FallbackPolicy | boolean;
}

export interface EmbedOptions {
  /**
   * The served model to use, by any name the server accepts for it (see `models()`).
   * Default: the client's `model` option when given, else the server's default model. A
   * name the server does not serve rejects with code 'model_not_found'.
   */
  model?: string;
  /**
   * Shorter vectors, where the model allows: the hash tier computes this many buckets directly
   * (hash-v1-<dimensions>'s vectors, labelled with the served model's name, as the server
   * does); ML models keep the first values, re-normalised.
   */
  dimensions?: number;
}

/** Labels every result carries, as non-enumerable properties (JSON and spreading ignore them). */
export interface ResultLabels {
  /** The model that made every vector of the result, e.g. 'hash-v1-384'. null for embed([]). */
  readonly model: string | null;
  /** The backend that made them: the server's (e.g. 'hash'), or 'hash' for the fallback. */
  readonly backend: string | null;
  /** 'server', or 'fallback' when the in-process hash embedding answered. */
  readonly source: Source | null;
}

/** Vectors in input order: a plain array of number arrays, labelled. */
export type Embeddings = number[][] & ResultLabels;
/** One vector: a plain number array, labelled. */
export type Embedding = number[] & ResultLabels;

export interface RerankOptions {
  /** At most this many results (the best ones). Default: all documents. */
  topN?: number;
  /**
   * A served reranker or embedding model (an embedding model ranks by the cosine similarity
   * of its vectors). Default: the server's first reranker, else its default model.
   */
  model?: string;
}

/** One document of a rerank result: its index in the call's documents, score and text. */
export interface Ranking {
  index: number;
  score: number;
  document: string;
}

/** Documents best first, labelled; `method` says how they were scored. */
export type Rankings = Ranking[] & ResultLabels & {
  readonly method: 'cross-encoder' | 'embeddings';
};

export interface HealthResult {
  ok: boolean;
  /** 'ok', the server's reason for a 503 ('loading', 'draining'), 'unreachable', 'not_embedserve' or 'closed'. */
  status: string;
  url: string;
  owned: boolean;
  error?: string;
}

/** The server's GET /info; the fields clients rely on, and whatever else it says. */
export interface ServerInfo {
  backend: string;
  /** The default model (what calls that name none get). */
  model: string;
  dimensions: number;
  max_batch_size?: number;
  max_body_bytes?: number;
  pid?: number;
  [field: string]: unknown;
}

export interface EmbedServeClientEvents {
  serverSpawn: [{ pid: number; command: string }];
  serverStart: [{ pid: number; url: string; command: string }];
  serverExit: [{ pid: number; code: number | null; signal: string | null; expected: boolean }];
  connect: [{ url: string; owned: boolean; info: ServerInfo }];
  fallback: [{ error: EmbedServeError; model: string }];
  /** A call got another model than the last call that asked for the same model (or none). */
  modelChange: [{ from: string; to: string; source: Source }];
  log: [line: string, stream: 'stdout' | 'stderr'];
}

export class EmbedServeClient extends EventEmitter {
  constructor(options?: EmbedServeOptions);
  /** Where the server in use answers (or will be looked for). */
  readonly url: string;
  /** Whether the server in use is one this client started (and will stop). */
  readonly ownsServer: boolean;
  /** The server process in use: the one this client started, or the one /info names. */
  readonly serverPid: number | null;
  /** The last output lines of the server this client started most recently. */
  readonly serverLog: string[];
  readonly closed: boolean;
  /** The model, backend and source of the last result (null before the first). */
  lastModel: string | null;
  lastBackend: string | null;
  lastSource: Source | null;

  /** Find or start the server now rather than on first use. */
  connect(): Promise<this>;
  /** Embed non-empty strings, in order. */
  embed(texts: string[], options?: EmbedOptions): Promise<Embeddings>;
  /** Embed one non-empty string. */
  embedSingle(text: string, options?: EmbedOptions): Promise<Embedding>;
  /** Rank non-empty strings by relevance to a query, best first. */
  rerank(query: string, documents: string[], options?: RerankOptions): Promise<Rankings>;
  /** One GET /health, without starting a server or retrying. Never rejects. */
  health(): Promise<HealthResult>;
  /** The server's GET /info (starting a server if allowed). */
  info(): Promise<ServerInfo>;
  /**
   * The names of the served models (GET /v1/models), in the server's order: the first is its
   * default (starting a server if allowed).
   */
  models(): Promise<string[]>;
  /** Stop the server this client started, if any, and refuse further calls. Idempotent. */
  close(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;

  on<E extends keyof EmbedServeClientEvents>(event: E, listener: (...args: EmbedServeClientEvents[E]) => void): this;
  once<E extends keyof EmbedServeClientEvents>(event: E, listener: (...args: EmbedServeClientEvents[E]) => void): this;
  off<E extends keyof EmbedServeClientEvents>(event: E, listener: (...args: EmbedServeClientEvents[E]) => void): this;
}

/** The same class under the name of the embedder it replaces. */
export const NomicEmbedder: typeof EmbedServeClient;
export type NomicEmbedder = EmbedServeClient;

export type ErrorCode =
  | 'unavailable'
  | 'timeout'
  | 'unreachable'
  | 'not_embedserve'
  | 'start_failed'
  | 'start_timeout'
  | 'validation'
  | 'model_not_found'
  | 'authentication'
  | 'http_error'
  | 'bad_response'
  | 'model_changed'
  | 'closed'
  | 'invalid_option';

export const ERROR_CODES: readonly ErrorCode[];

export class EmbedServeError extends Error {
  readonly name: 'EmbedServeError';
  /** What went wrong; see the README's table. */
  readonly code: ErrorCode;
  /** HTTP status of the server's answer, when there was one. */
  readonly status?: number;
  /** The server's own error message. */
  readonly serverMessage?: string;
  /** The server's error type (OpenAI shape), e.g. 'invalid_request_error'. */
  readonly type?: string;
  /** The request field the server objected to. */
  readonly param?: string | null;
  readonly url?: string;
  /** The last output lines of a server that failed to start. */
  readonly serverLog?: string[];
  /** Exit code of a server that exited while starting. */
  readonly exitCode?: number | null;
  /** Index of the first text of the request that failed, when a call was split. */
  readonly inputOffset?: number;
  /** model_not_found: the model name the call asked for. */
  readonly model?: string;
  /** model_not_found: the names the server serves (GET /v1/models), when they could be read. */
  readonly available?: string[];
  /** Whether no server could be had (the errors a fallback may answer in place of). */
  readonly serverUnavailable: boolean;
}

export const DEFAULT_URL: string;
export const DEFAULT_DIMENSIONS: number;
export const HASH_VERSION: number;

/** The hash embedding `hash-v1-<D>` (docs/hash-embedding.md), bit for bit as the server's. */
export class HashEmbedder {
  constructor(dimensions?: number);
  readonly dimensions: number;
  /** 'hash-v1-<dimensions>' */
  readonly model: string;
  embed(texts: string[], options?: { normalize?: boolean }): number[][];
  embedOne(text: string, options?: { normalize?: boolean }): number[];
}

/** Hash embeddings of `texts` without a server. */
export function hashEmbed(texts: string[], options?: { dimensions?: number; normalize?: boolean }): number[][];
/** 'hash-v1-<dimensions>' */
export function hashModelName(dimensions?: number): string;
/** The hash tier's lower-cased word tokens. */
export function tokenize(text: string): string[];
/** CRC-32 (zlib's) of bytes[start, end). */
export function crc32(bytes: Uint8Array, start?: number, end?: number): number;
