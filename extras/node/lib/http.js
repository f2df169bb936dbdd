// HTTP helpers of the client: what fetch failures and error answers mean, and decoding.

import { EmbedServeError } from './errors.js';

export const RETRYABLE_STATUSES = new Set([408, 429, 502, 503, 504]);
const VALIDATION_STATUSES = new Set([400, 413, 422]);
const AUTH_STATUSES = new Set([401, 403]);
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

// Internal error types: they never reach the caller (the client turns them into
// EmbedServeError once its retries are spent).

/** No HTTP answer: connection refused or reset, unknown host, timeout. */
export class TransportError extends Error {
  constructor(cause, url, timeoutMs) {
    const timedOut = cause?.name === 'TimeoutError';
    super(timedOut ? `no answer from ${url} within ${timeoutMs} ms` : `cannot reach ${url}: ${describeCause(cause)}`);
    this.cause = cause;
    this.timedOut = timedOut;
    this.refused = socketCode(cause) === 'ECONNREFUSED';
  }
}

/** An HTTP status worth retrying (the server is busy, starting or stopping). */
export class RetryableStatus extends Error {
  constructor(status, serverMessage, retryAfter) {
    super(`HTTP ${status}: ${serverMessage}`);
    this.status = status;
    this.serverMessage = serverMessage;
    this.retryAfterMs = retryAfter;
  }
}

export function decodeFloat32Base64(text, url) {
  const bytes = Buffer.from(text, 'base64');
  if (bytes.length % 4 !== 0) {
    throw new EmbedServeError(`unexpected answer from ${url}: a base64 embedding is not a ` +
      'whole number of float32 values', { code: 'bad_response', url });
  }
  if (LITTLE_ENDIAN) {
    // Copy first: a Buffer may sit at any offset of a shared pool, and a Float32Array
    // needs an offset that is a multiple of 4.
    return Array.from(new Float32Array(new Uint8Array(bytes).buffer));
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  return Array.from({ length: bytes.length / 4 }, (_, i) => view.getFloat32(i * 4, true));
}

/**
 * Whether an error answer is retried: RETRYABLE_STATUSES, and a 500 that is not
 * embedserve's own JSON error, which comes from a proxy in front of the server (Ray Serve's
 * answers a plain 500 for a request whose replica died: another replica serves it).
 */
export function isRetryable(status, json) {
  if (RETRYABLE_STATUSES.has(status)) return true;
  return status === 500 && !(json && typeof json === 'object' && 'error' in json);
}

export function parseJson(text) {
  try {
    return text ? JSON.parse(text) : undefined;
  } catch {
    return undefined;
  }
}

/** {message, type, code, param} from any of the server's dialects, or the raw text. */
export function errorFields(json, text, statusText) {
  const error = json?.error;
  if (error && typeof error === 'object') { // OpenAI
    return { message: String(error.message ?? ''), type: error.type, code: error.code, param: error.param };
  }
  if (typeof error === 'string') return { message: error, type: json.error_type }; // TEI, Ollama
  return { message: (text ?? '').trim().slice(0, 500) || statusText || '(empty body)' };
}

export function httpError(status, { message, type, code, param }, url) {
  // A 404 about the request's `model` field: the server serves no model of that name (any
  // other 404 is a wrong URL, a plain http_error).
  const kind = status === 404 && param === 'model' ? 'model_not_found'
    : VALIDATION_STATUSES.has(status) ? 'validation'
      : AUTH_STATUSES.has(status) ? 'authentication' : 'http_error';
  const hint = kind === 'authentication' ? ' (set the apiKey option or EMBEDSERVE_API_KEY)' : '';
  return new EmbedServeError(`${status}${code ? ` ${code}` : ''}: ${message}${hint}`, {
    code: kind, status, serverMessage: message, type, param, url,
  });
}

export function retryAfterMs(headers) {
  const value = headers.get('retry-after');
  if (value === null) return undefined;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
  const date = Date.parse(value);
  return Number.isNaN(date) ? undefined : Math.max(0, date - Date.now());
}

function socketCode(error) {
  // fetch wraps the socket error: TypeError('fetch failed', {cause: Error('connect ECONNREFUSED')}).
  for (let e = error; e; e = e.cause) if (e.code) return e.code;
  return undefined;
}

function describeCause(error) {
  let inner = error;
  while (inner?.cause && inner.message === 'fetch failed') inner = inner.cause;
  const message = String(inner?.message ?? inner);
  return inner?.code && !message.includes(inner.code) ? `${inner.code} ${message}` : message;
}
