// HTTP helpers of the client: what fetch failures and error answers mean, and decoding.

import { EmbedServeError } from './errors.js';

export const RETRYABLE_STATUSES = new Set([408, 429, 502, 503, 504]);
const VALIDATION_STATUSES = new Set([400, 413, 422]);
const AUTH_STATUSES = new Set([401, 403]);
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
/**
 * The largest answer body read (256 MiB): past it the answer is refused. An answer that
 * kept growing would otherwise be buffered until timeoutMs ran out, or memory did. The
 * largest real answer (max_batch_size vectors as JSON doubles) is far below it.
 */
export const MAX_RESPONSE_BYTES = 256 * 1024 * 1024;
// The three forms of an HTTP date (RFC 9110 5.6.7): IMF-fixdate, RFC 850, asctime. Only
// these: Date.parse alone takes almost anything ('x-5' is a day in 2001).
const DAY = '(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)';
const MONTH = '(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)';
const HTTP_DATE = new RegExp(
  `^(?:${DAY}, \\d{2} ${MONTH} \\d{4} \\d{2}:\\d{2}:\\d{2} GMT` +
    `|(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), \\d{2}-${MONTH}-\\d{2} \\d{2}:\\d{2}:\\d{2} GMT` +
    `|${DAY} ${MONTH} [ \\d]\\d \\d{2}:\\d{2}:\\d{2} \\d{4})$`,
);
const SECONDS = /^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$/;

// Internal error types: they never reach the caller (the client turns them into
// EmbedServeError once its retries are spent).

/** No HTTP answer: connection refused or reset, unknown host, timeout. */
export class TransportError extends Error {
  constructor(cause, url, timeoutMs) {
    const timedOut = cause?.name === 'TimeoutError';
    // Something answered, but not in HTTP (an SSH banner, say): llhttp's parse errors.
    const notHttp = /^HPE_/.test(socketCode(cause) ?? '');
    super(timedOut ? `no answer from ${url} within ${timeoutMs} ms`
      : notHttp ? `${url} answered something that is not HTTP: ${describeCause(cause)}`
        : `cannot reach ${url}: ${describeCause(cause)}`);
    this.cause = cause;
    this.timedOut = timedOut;
    this.refused = socketCode(cause) === 'ECONNREFUSED';
    this.notHttp = notHttp;
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
  let values;
  if (LITTLE_ENDIAN) {
    // Copy first: a Buffer may sit at any offset of a shared pool, and a Float32Array
    // needs an offset that is a multiple of 4.
    values = Array.from(new Float32Array(new Uint8Array(bytes).buffer));
  } else {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
    values = Array.from({ length: bytes.length / 4 }, (_, i) => view.getFloat32(i * 4, true));
  }
  // NaN and infinities are no embedding: they would poison every similarity computed with them.
  if (!values.every(Number.isFinite)) {
    throw new EmbedServeError(`unexpected answer from ${url}: a base64 embedding holds a ` +
      'value that is not a finite number (NaN or infinity)', { code: 'bad_response', url });
  }
  return values;
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

/**
 * The wait a Retry-After header asks for, in ms: a positive finite number of seconds, or a
 * future HTTP date. Anything else (0, negative, empty, garbage, a past date) is ignored
 * (undefined): the normal backoff applies, never a zero delay, which would send requests
 * as fast as the server answers them.
 */
export function retryAfterMs(headers) {
  const value = headers.get('retry-after')?.trim();
  if (!value) return undefined;
  if (SECONDS.test(value)) {
    const seconds = Number(value);
    return Number.isFinite(seconds) && seconds > 0 ? seconds * 1000 : undefined;
  }
  if (!HTTP_DATE.test(value)) return undefined;
  const wait = Date.parse(value) - Date.now();
  return wait > 0 ? wait : undefined;
}

/**
 * The body of `response` as text, refused past `limit` bytes (bad_response naming the
 * limit) rather than buffered without bound. Transport failures while reading (a reset, the
 * request's timeout) reject as they would from response.text().
 */
export async function readBody(response, url, limit = MAX_RESPONSE_BYTES) {
  if (!response.body) return '';
  const reader = response.body.getReader();
  const chunks = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > limit) {
      reader.cancel().catch(() => {}); // closes the connection: nothing more is read
      throw new EmbedServeError(`unexpected answer from ${url}: its body is larger than ` +
        `${describeBytes(limit)}, the most this client reads`, { code: 'bad_response', url });
    }
    chunks.push(value);
  }
  // As response.text() decodes: UTF-8, a byte-order mark dropped.
  return new TextDecoder().decode(Buffer.concat(chunks, size));
}

/**
 * A 3xx answer. embedserve never redirects: a redirect comes from something else at the
 * URL (a proxy, a login page), and following it would send the request, API key included,
 * wherever it points. Not retried.
 */
export function redirectError(method, url, response) {
  const location = response.headers.get('location');
  response.body?.cancel().catch(() => {});
  const where = location === null ? 'no Location header' : `Location: ${location}`;
  return new EmbedServeError(`${method} ${url} answered ${response.status} (a redirect, ${where}); ` +
    'embedserve servers do not redirect: give the client the final URL',
  { code: 'http_error', status: response.status, url });
}

function describeBytes(bytes) {
  return bytes % (1024 * 1024) === 0 ? `${bytes / (1024 * 1024)} MiB` : `${bytes} bytes`;
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
