// The in-process fallback: the JavaScript hash embedding when no server can be had, and the
// policy that says when it may stand in for the server's vectors. As the Python client's
// (embedserve/client/fallback.py):
// - a call that names no model: 'same-model' answers only with the model the server would
//   have used (the one it last answered with, a name /info gave the hash tier counting as
//   the hash tier's; before that, the one the options ask for, else the one the server at
//   this URL last said it served, to this or an earlier process: lastseen.js),
//   'always' whatever it was, 'never' not at all;
// - a call that names its model (`embed(texts, {model})`) gets that model's vectors or
//   none: the fallback answers it only when the name is the hash tier's ('hash',
//   'hash-v1-<D>', or a name the server's /info gave its hash tier), under any policy but
//   'never', and never for another model, whatever the policy.

import { validationError } from './errors.js';
import { DEFAULT_DIMENSIONS, HASH_VERSION, HashEmbedder, hashModelName } from './hash.js';
import { recall, remember, stateFile } from './lastseen.js';

const ML_BACKENDS = ['sentence-transformers', 'transformers'];
// Fallback embedders kept for request-time `dimensions` other than the model's own size.
const MAX_FALLBACK_SIZES = 4;
/** What a call may name the hash tier: `--model hash` serves it. */
export const HASH_TIER = 'hash';
/** The hash tier's model ids (hash-v1-384), lower-cased. */
export const HASH_MODEL = new RegExp(`^hash-v${HASH_VERSION}-([1-9][0-9]*)$`);

export class Fallback {
  #options;
  #settings;
  /** The model and size the server last answered with: what a fallback must match. */
  servedModel = null;
  servedDimensions = null;
  servedReranker = null;
  /** @type {Map<string, [string, number]>} lower-cased names of the server's hash tier -> [the name its answers carry, its size] */
  #hashNames = new Map();
  #embedder = null;
  /** @type {Map<number, HashEmbedder>} other sizes (request-time `dimensions`, a named hash model), oldest first */
  #sized = new Map();
  /** The URLs of the servers the options name (not a private one's on port 0). */
  #urls;
  /** The URL whose remembered /info says what to match while no server answered; null: not looked up yet. */
  #recalled = null;

  /**
   * @param {object} options the client's resolved options
   * @param {object} settings the EMBEDSERVE_* settings a started server would see
   * @param {string[]} urls the URLs of the servers the options name, whose /info is kept for other processes
   */
  constructor(options, settings, urls = []) {
    this.#options = options;
    this.#settings = settings;
    this.#urls = urls;
  }

  /**
   * What a server's GET /info says it serves: its default model (what calls that name no
   * model get), and the names of its hash tier (its `models` list, where it has one).
   * `url`: the server's, kept for other processes (lastseen.js) when the options name it.
   */
  learn(info, url) {
    if (url !== undefined) { // a server answered: what it says now beats any memory
      this.#recalled = '';
      if (this.#urls.includes(url)) remember(url, info);
    }
    this.servedModel = info.model;
    // The first reranker it serves: what a rerank naming no model gets.
    const reranker = (Array.isArray(info.models) ? info.models : []).find((entry) => entry?.kind === 'reranker');
    this.servedReranker = reranker ? (reranker.names?.[0] ?? reranker.model) : null;
    this.servedDimensions = Number.isInteger(info.dimensions) ? info.dimensions : null;
    const entries = Array.isArray(info.models) ? info.models : [{ names: [info.model], ...info }];
    const hashNames = new Map();
    for (const entry of entries) {
      if (entry?.backend !== 'hash' || !(Number.isSafeInteger(entry.dimensions) && entry.dimensions > 0)) continue;
      const names = [...(Array.isArray(entry.names) ? entry.names : []), entry.model]
        .filter((name) => typeof name === 'string');
      for (const name of names) {
        const key = name.toLowerCase();
        if (!hashNames.has(key)) hashNames.set(key, [names[0], entry.dimensions]);
      }
    }
    this.#hashNames = hashNames;
  }

  /**
   * The name to send for `model`: 'hash' (what `--model hash` serves, and what the fallback
   * answers for) becomes the name the server's /info gave its hash tier, where the server
   * does not list 'hash' itself; any other name goes as it is.
   */
  requestName(model) {
    if (model.toLowerCase() !== HASH_TIER || this.#hashNames.has(HASH_TIER)) return model;
    return this.#hashNames.values().next().value?.[0] ?? model;
  }

  /**
   * The in-process embedder the policy allows for a call asking for `model` (undefined:
   * the server's default): {embedder, label} (the model name its result carries), or
   * {refusal} saying why none.
   */
  plan(model) {
    const policy = this.#options.fallback;
    if (policy === 'never') return { refusal: "fallback is off (fallback: 'never')" };
    if (model !== undefined) return this.#planNamed(model);
    const served = this.servedDimensions;
    // A name the server's /info gave its hash tier (e.g. by --served-model-name): that is
    // the model, under the name the server's answers carry.
    const known = typeof this.servedModel === 'string'
      ? this.#hashNames.get(this.servedModel.toLowerCase()) : undefined;
    // Else a hash-tier server's size wins over the options: the fallback must match it.
    const [local, dimensions] = known ?? (served && this.servedModel === hashModelName(served)
      ? [hashModelName(served), served]
      : [hashModelName(this.#configuredDimensions()), this.#configuredDimensions()]);
    if (policy === 'same-model') {
      const expected = this.servedModel ?? this.#requestedModel(dimensions);
      if (expected === null && this.#recall()) return this.plan(model); // as if it had answered
      if (expected !== null && expected !== local) {
        const seen = this.#recalled ? ` (what it last said it serves, kept in ${stateFile()})` : '';
        return {
          refusal: `the server's model is ${expected}${seen}, the in-process fallback would be ` +
            `${local} (pass fallback: 'always' to accept vectors from another model)`,
        };
      }
    }
    if (this.#embedder?.dimensions !== dimensions) this.#embedder = new HashEmbedder(dimensions);
    return { embedder: this.#embedder, label: local };
  }

  /**
   * plan() for a rerank call: also, under 'same-model', never in place of the server's
   * reranker (what a call naming no model gets when the server serves one).
   */
  rerankPlan(model) {
    const plan = this.plan(model); // first: it may recall what the server serves
    if (model === undefined && this.servedReranker && this.#options.fallback === 'same-model') {
      return {
        refusal: `the server reranks with ${this.servedReranker}, the in-process fallback ` +
          "would rank by hash embeddings (pass fallback: 'always' to accept that)",
      };
    }
    return plan;
  }

  /** Learn what the servers of these options last said they serve, once: whether anything was remembered. */
  #recall() {
    if (this.#recalled !== null) return false;
    this.#recalled = '';
    for (const url of this.#urls) {
      const info = recall(url);
      if (typeof info?.model === 'string') {
        this.learn(info);
        this.#recalled = url;
        return true;
      }
    }
    return false;
  }

  /**
   * Vectors for `texts` from the embedder `plan` gave, as the server's hash tier answers
   * them: `dimensions` buckets computed directly (not the first values of the full
   * vector), rounded to float32 where the transport is base64, so that they equal the
   * server's bit for bit.
   */
  embed(embedder, texts, dimensions) {
    if (dimensions !== undefined && dimensions > embedder.dimensions) {
      throw validationError(`'dimensions' must be between 1 and ${embedder.dimensions} for ` +
        `model ${embedder.model}, got ${dimensions}`, 'dimensions', 422);
    }
    const vectors = this.#sizedEmbedder(embedder, dimensions).embed(texts);
    return this.#options.encodingFormat === 'base64'
      ? vectors.map((vector) => vector.map(Math.fround)) : vectors;
  }

  /** A call that named its model: the hash tier's embedder when it names the hash tier. */
  #planNamed(model) {
    const wanted = model.toLowerCase();
    let known = this.#hashNames.get(wanted);
    if (!known && wanted === HASH_TIER) {
      // The hash tier the server listed; else the one a server started here would run.
      const dimensions = this.#configuredDimensions();
      known = this.#hashNames.values().next().value ?? [hashModelName(dimensions), dimensions];
    }
    const match = known ? null : HASH_MODEL.exec(wanted);
    if (match) known = [hashModelName(Number(match[1])), Number(match[1])];
    if (!known) {
      return {
        refusal: `the call asked for model ${JSON.stringify(model)}, and the in-process ` +
          `fallback serves only the hash tier ('${HASH_TIER}', hash-v${HASH_VERSION}-<dimensions>)`,
      };
    }
    const [label, dimensions] = known;
    const embedder = this.#embedder?.dimensions === dimensions ? this.#embedder
      : this.#sizedEmbedder(null, dimensions);
    return { embedder, label };
  }

  #sizedEmbedder(embedder, dimensions) {
    if (embedder && (dimensions === undefined || dimensions === embedder.dimensions)) return embedder;
    // A few recent sizes only: each embedder keeps its own word cache.
    const sized = this.#sized.get(dimensions) ?? new HashEmbedder(dimensions);
    this.#sized.delete(dimensions);
    this.#sized.set(dimensions, sized);
    if (this.#sized.size > MAX_FALLBACK_SIZES) this.#sized.delete(this.#sized.keys().next().value);
    return sized;
  }

  #setting(name) {
    return this.#options[name] ?? this.#settings[name];
  }

  #configuredDimensions() {
    return this.#setting('dimensions') ?? DEFAULT_DIMENSIONS;
  }

  /** The model a started server would serve, where the options say; null if unknown. */
  #requestedModel(dimensions) {
    const backend = this.#setting('backend') ?? 'auto';
    const model = this.#setting('model');
    // --model hash serves the hash tier, whatever the backend.
    if (backend === 'hash' || model?.toLowerCase() === HASH_TIER) return hashModelName(dimensions);
    if (model && HASH_MODEL.test(model.toLowerCase())) return model.toLowerCase();
    if (ML_BACKENDS.includes(backend) || model) return `${model || backend} (${backend})`;
    return null;
  }
}
