// Several servers behind one client (the `urls` option, or EMBEDSERVE_URL="URL,URL"): the
// same policy as the Python client's (embedserve/client/pool.py). The servers are taken to
// serve alike (replicas of one deployment). Each request goes to the server with the
// fewest of this client's requests in flight that is not backing off (ties: the one picked
// least recently, so sequential calls take turns). A server that fails a request -- no
// answer, a timeout, a retryable status -- backs off for a while that doubles with each
// failure in a row (backoffMs up to maxBackoffMs, with jitter, or its Retry-After), and the
// request goes at once to another server. Only when every server backs off does a request
// wait, by the same retry policy and within the same retryTimeoutMs as with one server. A
// server whose back-off has passed gets requests again. No server is ever started here.

export class ServerPool {
  #members;
  #picks = 0;
  #delay;

  /**
   * @param {{base: string}[]} targets
   * @param {(failures: number, retryAfterMs?: number) => number} delay the client's backoff
   */
  constructor(targets, delay) {
    this.#members = targets.map((target) => ({ base: target.base, inFlight: 0, failures: 0, backUntil: 0, lastPick: 0 }));
    this.#delay = delay;
    /** The member picked last. */
    this.last = this.#members[0];
  }

  get size() {
    return this.#members.length;
  }

  get url() {
    return this.bases.join(',');
  }

  /** Every server's base URL, in the order given. */
  get bases() {
    return this.#members.map((member) => member.base);
  }

  /** The server for the next request, counted in flight until release(). */
  pick() {
    const now = Date.now();
    const ready = this.#members.filter((member) => member.backUntil <= now);
    const member = ready.length
      ? minBy(ready, (a, b) => a.inFlight - b.inFlight || a.lastPick - b.lastPick)
      : minBy(this.#members, (a, b) => a.backUntil - b.backUntil);
    member.inFlight++;
    member.lastPick = ++this.#picks;
    this.last = member;
    return member;
  }

  release(member) {
    member.inFlight--;
  }

  /** `member` answered: healthy again. */
  served(member) {
    member.failures = 0;
    member.backUntil = 0;
  }

  /** `member` failed a request: it backs off. Whether another server can take it now. */
  skip(member, retryAfterMs) {
    const now = Date.now();
    member.failures++;
    member.backUntil = Math.max(member.backUntil, now + this.#delay(member.failures, retryAfterMs));
    return this.#members.some((other) => other !== member && other.backUntil <= now);
  }
}

function minBy(items, compare) {
  return items.reduce((best, item) => (compare(item, best) < 0 ? item : best));
}
