// One `python -m embedserve` process that this program started, and the process-wide
// registry that stops every such process when the program exits.

import { spawn } from 'node:child_process';
import { EventEmitter } from 'node:events';
import { createInterface } from 'node:readline';
import { EmbedServeError } from './errors.js';

// The one line the server prints on stdout when it serves: the URL it listens on (the
// real port when started with --port 0), what it serves and the pid of the process that
// owns the socket. The contract is embedserve/contracts.py; tests/data/ready_lines.json
// holds samples both parsers are tested against. A model may hold ", ": fields are found
// by name, the model lazily up to the next one.
const READY_LINE = new RegExp(
  String.raw`embedserve ready at (?<url>https?://\S+) \(backend=(?<backend>[^,]*), ` +
    String.raw`model=(?<model>.*?), dimensions=(?<dimensions>\d+), ` +
    String.raw`pid=(?<pid>\d+), workers=(?<workers>\d+)\)`,
);
const CANNOT_LISTEN = /cannot listen on/;
const LOG_TAIL_SHOWN = 20;
// After 'exit', how long to wait for the pipes to drain the last log lines.
const PIPE_DRAIN_MS = 500;
// A server that never became ready has nothing to finish: a short grace before SIGKILL.
const STOP_GRACE_MS = 2000;
// After SIGKILL, how long stop() waits for the exit before it gives up on the process.
const KILL_WAIT_MS = 5000;
const POSIX = process.platform !== 'win32';

/**
 * The fields of the server's ready line, or null when `line` holds none.
 * @param {string} line
 */
export function parseReadyLine(line) {
  const match = READY_LINE.exec(line);
  if (!match) return null;
  const { url, backend, model } = match.groups;
  const number = (name) => Number(match.groups[name]);
  return { url, backend, model, dimensions: number('dimensions'), pid: number('pid'),
    workers: number('workers'), port: Number(url.slice(url.lastIndexOf(':') + 1)) };
}

// -- stop what we started when the program ends ---------------------------------------------
// Installed only while at least one server is running, so that a program that closed its
// embedders gets back Node's default signal behaviour.

/** @type {Set<ServerProcess>} */
const running = new Set();
const EXIT_SIGNALS = POSIX ? ['SIGINT', 'SIGTERM', 'SIGHUP'] : ['SIGINT', 'SIGTERM'];
const signalHandlers = new Map(EXIT_SIGNALS.map((sig) => [sig, () => onSignal(sig)]));

function stopAllOnExit() {
  // 'exit' listeners must be synchronous: a signal is all we can send. The server stops
  // gracefully on SIGTERM on its own; it does not need us alive for that.
  for (const server of running) server.signal('SIGTERM');
}

function onSignal(sig) {
  stopAllOnExit();
  // We listen only so that our servers stop too. If nobody else handles this signal, do
  // what Node would have done without us: remove our handlers and die of the signal.
  if (process.listenerCount(sig) === 1) {
    uninstallExitHooks();
    process.kill(process.pid, sig);
  }
}

function installExitHooks() {
  if (running.size !== 1) return; // already installed
  process.on('exit', stopAllOnExit);
  for (const [sig, handler] of signalHandlers) process.on(sig, handler);
}

function uninstallExitHooks() {
  process.removeListener('exit', stopAllOnExit);
  for (const [sig, handler] of signalHandlers) process.removeListener(sig, handler);
}

function track(server) {
  running.add(server);
  installExitHooks();
}

function untrack(server) {
  if (running.delete(server) && running.size === 0) uninstallExitHooks();
}

// -- the process ----------------------------------------------------------------------------

/**
 * Events: 'log' (line, stream), 'exit' (code, signal).
 */
export class ServerProcess extends EventEmitter {
  /** stop() calls waiting for the exit: the child is ref'd while there is one. */
  #stopping = 0;

  /**
   * @param {object} options
   * @param {string} options.python
   * @param {string[]} options.args arguments after the executable
   * @param {NodeJS.ProcessEnv} options.env
   * @param {string} [options.cwd]
   * @param {number} [options.logLines] how many output lines to keep for error messages
   */
  constructor({ python, args, env, cwd, logLines = 100 }) {
    super();
    this.python = python;
    this.args = args;
    this.env = env;
    this.cwd = cwd;
    this.logLines = logLines;
    /** @type {string[]} */
    this.log = [];
    /** @type {import('node:child_process').ChildProcess | null} */
    this.child = null;
    this.url = null;
    /** @type {{code: number|null, signal: string|null} | null} */
    this.exitStatus = null;
    this._exited = null; // a promise resolved on 'exit'
  }

  get pid() {
    return this.child?.pid;
  }

  get command() {
    return [this.python, ...this.args].join(' ');
  }

  get alive() {
    return this.child !== null && this.exitStatus === null;
  }

  /** The last output lines, for error messages. */
  tail(n = LOG_TAIL_SHOWN) {
    return this.log.slice(-n);
  }

  /**
   * Spawn the server and wait for its ready line.
   * Rejects with EmbedServeError: start_failed (could not run, or exited before it was
   * ready: `addressInUse` tells whether the port was taken) or start_timeout (killed at
   * the deadline). No process is left behind when it rejects.
   * @param {number} deadline Date.now() value
   * @returns {Promise<string>} the URL from the ready line
   */
  start(deadline) {
    return new Promise((resolve, reject) => {
      let settled = false;
      let timedOut = false;
      let timer = null;
      const settle = (error, url) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (error) reject(error);
        else resolve(url);
      };

      let child;
      try {
        child = spawn(this.python, this.args, {
          cwd: this.cwd,
          env: this.env,
          // stdin: a pipe only this process holds and nobody writes to. A server started
          // with EMBEDSERVE_WATCH_STDIN=1 stops when it closes: when this process is gone,
          // however it ended (kill -9 included, which runs no 'exit' hook).
          stdio: ['pipe', 'pipe', 'pipe'],
          // Its own process group: a Ctrl-C meant for this program (a REPL's, say) does not
          // reach the server; we stop it ourselves, and can kill its whole group if needed.
          detached: POSIX,
          windowsHide: true,
        });
      } catch (error) {
        settle(this.#cannotRun(error));
        return;
      }
      this.child = child;
      this._exited = new Promise((done) => child.once('exit', done));
      track(this);
      // The server must not keep this program alive: when the program ends, the 'exit'
      // hook stops the server. (While we wait for it to start, `timer` keeps us alive.)
      child.unref();
      for (const stream of [child.stdin, child.stdout, child.stderr]) stream.unref?.();
      child.stdin.on('error', () => {}); // EPIPE once the server is gone: nothing to do

      let closed = false;
      child.once('close', () => {
        closed = true;
      });
      this.#readLines(child.stdout, 'stdout', (line) => {
        const ready = parseReadyLine(line);
        if (ready && !this.url) {
          this.url = ready.url;
          settle(null, this.url);
        }
      });
      this.#readLines(child.stderr, 'stderr');

      child.on('error', (error) => {
        // ENOENT / EACCES: the executable could not be run at all (no pid, maybe no 'exit').
        if (child.pid !== undefined) return;
        this.#markExited(null, null);
        settle(this.#cannotRun(error));
      });
      child.once('exit', (code, signal) => {
        this.#markExited(code, signal);
        if (settled || timedOut) return;
        // Let the pipes deliver the last lines (the reason it exited) before reporting.
        const report = () => settle(this.#exitedEarly(code, signal));
        if (closed) report();
        else {
          child.once('close', report);
          setTimeout(report, PIPE_DRAIN_MS);
        }
      });

      const waitMs = Math.max(0, deadline - Date.now());
      timer = setTimeout(async () => {
        if (settled) return;
        timedOut = true; // its exit, which follows, is ours: report the timeout
        await this.stop(STOP_GRACE_MS);
        settle(new EmbedServeError(
          `the embedserve server did not become ready within ${waitMs} ms ` +
            `(started with: ${this.command}); it was stopped.${this.#tailText()}`,
          { code: 'start_timeout', serverLog: this.tail() },
        ));
      }, waitMs);
    });
  }

  /** Describes how it exited, for messages: 'exited with code 1', 'was killed by SIGKILL'. */
  describeExit() {
    const { code, signal } = this.exitStatus ?? {};
    return signal ? `was killed by ${signal}` : `exited with code ${code}`;
  }

  /** Send a signal to the server, if it still runs. */
  signal(sig) {
    if (!this.alive) return;
    try {
      this.child.kill(sig);
    } catch {
      // Already gone: nothing to stop.
    }
  }

  /**
   * Stop gracefully: SIGTERM, then SIGKILL after `graceMs`. Resolves once it has exited.
   * Whatever is left in its process group then (workers of a supervisor that was killed)
   * is killed too: nothing this client started may outlive it.
   */
  async stop(graceMs) {
    if (this.child === null) return;
    if (this.alive) {
      this.signal('SIGTERM');
      // The child and its pipes are unref'd (the server must not keep the program alive),
      // and a pending promise does not keep it alive either: without a ref, a program
      // awaiting close() (or a start that timed out) would end silently once the SIGKILL
      // timer has fired, before the exit we wait for is reported. Ref it while we wait.
      this.#stopping++;
      this.child.ref();
      let killTimer;
      let giveUpTimer;
      const killed = new Promise((resolve) => {
        killTimer = setTimeout(() => {
          this.#killGroup();
          // Bounded: a process that SIGKILL does not end (stuck in the kernel) is left.
          giveUpTimer = setTimeout(resolve, KILL_WAIT_MS);
        }, graceMs);
      });
      try {
        await Promise.race([this._exited, killed]);
      } finally {
        clearTimeout(killTimer);
        clearTimeout(giveUpTimer);
        if (--this.#stopping === 0) this.child.unref();
      }
    }
    this.#killGroup();
  }

  #killGroup() {
    if (this.child?.pid === undefined) return;
    try {
      // detached: it leads its own process group, whose id is its pid.
      if (POSIX) process.kill(-this.child.pid, 'SIGKILL');
      else this.signal('SIGKILL');
    } catch {
      // No process left in the group.
    }
  }

  #markExited(code, signal) {
    if (this.exitStatus !== null) return;
    this.exitStatus = { code, signal };
    untrack(this);
    this.emit('exit', code, signal);
  }

  #readLines(stream, name, onLine) {
    const lines = createInterface({ input: stream, crlfDelay: Infinity });
    lines.on('line', (line) => {
      this.log.push(line);
      if (this.log.length > this.logLines) this.log.shift();
      this.emit('log', line, name);
      onLine?.(line);
    });
  }

  #cannotRun(error) {
    const hint = error.code === 'ENOENT'
      ? ' Set the `python` option or EMBEDSERVE_PYTHON to a Python with embedserve installed.'
      : '';
    return new EmbedServeError(
      `cannot run the embedserve server (${this.command}): ${error.message}.${hint}`,
      { code: 'start_failed', cause: error },
    );
  }

  #exitedEarly(code, signal) {
    const how = this.describeExit();
    const text = this.log.join('\n');
    let hint = '';
    if (/No module named embedserve/.test(text)) {
      hint = ` Install it for ${this.python} (pip install embedserve) or set the \`python\` ` +
        'option or EMBEDSERVE_PYTHON.';
    }
    const error = new EmbedServeError(
      `the embedserve server ${how} before it was ready (started with: ${this.command}).` +
        `${hint}${this.#tailText()}`,
      { code: 'start_failed', serverLog: this.tail(), exitCode: signal ? null : code },
    );
    // Exit code 1 + "cannot listen": the port is taken, most likely by a server another
    // client started at the same moment. The caller checks whether that one answers.
    error.addressInUse = code === 1 && CANNOT_LISTEN.test(text);
    return error;
  }

  #tailText() {
    const tail = this.tail();
    return tail.length ? `\nLast server output:\n  ${tail.join('\n  ')}` : ' It printed nothing.';
  }
}
