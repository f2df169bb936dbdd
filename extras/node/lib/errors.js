// The one error type the client throws. `code` says what went wrong in terms a program can
// branch on; the other fields carry what the server or the server process said.

/**
 * code -> whether it means "no server could be had" (the Python client's
 * ServerUnavailable): only those let the fallback policy answer instead. A request the
 * server rejected (bad input, wrong API key) is the caller's to fix: a fallback would
 * only hide it.
 */
const UNAVAILABLE = {
  unavailable: true, // connection failures, 408/429/502/503/504: still failing at retryTimeoutMs
  timeout: true, // no answer within timeoutMs, still at retryTimeoutMs
  unreachable: true, // nothing answers, and no server may be started for this URL
  not_embedserve: true, // something that is not an embedserve server answers at the URL
  start_failed: true, // the server process could not run, or exited before it was ready
  start_timeout: true, // the server was not ready within startTimeoutMs (retryTimeoutMs when nothing may be started)
  validation: false, // HTTP 400/413/422, or caught before sending: the input is wrong
  model_not_found: false, // HTTP 404 for the request's model: the server serves no model of that name
  authentication: false, // HTTP 401/403: missing or wrong apiKey
  http_error: false, // any other HTTP error status
  bad_response: false, // an answer that is not in embedserve's shape
  model_changed: false, // the server changed models during one call, twice
  closed: false, // the client was closed
  invalid_option: false, // a constructor option is wrong (e.g. a bad URL)
};

export const ERROR_CODES = Object.freeze(Object.keys(UNAVAILABLE));

export class EmbedServeError extends Error {
  /**
   * @param {string} message
   * @param {object} details
   * @param {string} details.code one of ERROR_CODES
   * @param {number} [details.status] HTTP status of the server's answer
   * @param {string} [details.serverMessage] the server's own error message
   * @param {string} [details.type] the server's error type (OpenAI shape)
   * @param {string|null} [details.param] the request field the server objected to
   * @param {string} [details.url] the URL involved
   * @param {string[]} [details.serverLog] the server process's last output lines
   * @param {number|null} [details.exitCode] how the server process exited, if it did
   * @param {string} [details.model] model_not_found: the name the call asked for
   * @param {string[]} [details.available] model_not_found: the names the server serves
   * @param {unknown} [details.cause]
   */
  constructor(message, { code, cause, ...details } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'EmbedServeError';
    this.code = code;
    for (const [key, value] of Object.entries(details)) {
      if (value !== undefined) this[key] = value;
    }
  }

  /**
   * Whether the error means that no server could be had (as opposed to a request the
   * server refused): the errors the fallback policy may answer in place of.
   */
  get serverUnavailable() {
    return UNAVAILABLE[this.code] ?? false;
  }
}

/** A request that is wrong (the server would answer `status`), caught before sending. */
export function validationError(message, param, status = 400) {
  return new EmbedServeError(`${status} ${message}`,
    { code: 'validation', status, serverMessage: message, param });
}
