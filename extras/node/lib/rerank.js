// Client.rerank's parts: its arguments checked once, the requests it sends (Cohere's
// /v2/rerank, which every embedserve server answers) split at the server's document
// limit, the answers read back and merged (a document's score depends on the query and
// that document alone), and the fallback's scores: cosine similarity of in-process hash
// embeddings, summed as the server's hash tier sums them, so that they equal its bit for bit.

import { validationError } from './errors.js';
import { modelEntry } from './info.js';

export const CROSS_ENCODER = 'cross-encoder';
export const EMBEDDINGS = 'embeddings';
const DEFAULT_MAX_DOCUMENTS = 1000;

/** Throws what the server would answer to bad arguments (so the fallback agrees). */
export function checkRerankArguments(query, documents, topN, model) {
  if (typeof query !== 'string') throw new TypeError(`rerank(): query must be a string, got ${typeof query}`);
  if (!Array.isArray(documents)) throw new TypeError('rerank(): documents must be an array of strings');
  if (!query) throw validationError("'query' is an empty string", 'query');
  if (documents.length === 0) throw validationError("'documents' must not be an empty list", 'documents');
  documents.forEach((document, i) => {
    if (typeof document !== 'string') throw new TypeError(`rerank(): documents[${i}] must be a string, got ${typeof document}`);
    if (!document) throw validationError(`'documents[${i}]' is an empty string`, 'documents');
  });
  if (topN !== undefined && !(Number.isSafeInteger(topN) && topN >= 1)) {
    throw validationError(`'top_n' must be an integer of at least 1, got ${topN}`, 'top_n', 422);
  }
  if (model !== undefined && (typeof model !== 'string' || !model.trim())) {
    throw validationError(`'model' must name a model, got ${JSON.stringify(model)}`, 'model');
  }
}

/** [index of the first document, request body] per request, within the server's limit. */
export function rerankBodies(query, documents, info, model) {
  const limit = Number.isSafeInteger(info?.max_rerank_documents) && info.max_rerank_documents > 0
    ? info.max_rerank_documents : DEFAULT_MAX_DOCUMENTS;
  const bodies = [];
  for (let first = 0; first < documents.length; first += limit) {
    const body = { query, documents: documents.slice(first, first + limit) };
    if (model !== undefined) body.model = model;
    bodies.push([first, body]);
  }
  return bodies;
}

/**
 * The rankings of one answer ({index, score, document}), its indexes made the call's. The
 * answer must rank the request's documents: each index an integer within the request's
 * documents, none twice, and as many results as min(the request's top_n, if it sent one,
 * its documents) -- every document exactly once when it sent none, as the client does
 * (the best topN are picked from all the requests' results). Anything else throws
 * `bad(what)`: a ranking with a made-up or missing document is no ranking.
 * @param {{documents: string[], top_n?: number}} body the request
 * @param {(what: string) => Error} bad
 */
export function readRankings(answer, first, body, documents, bad) {
  if (!Array.isArray(answer?.results) || typeof answer.model !== 'string') {
    throw bad('expected rerank results and a model name');
  }
  const count = body.documents.length;
  const expected = body.top_n === undefined ? count : Math.min(body.top_n, count);
  if (answer.results.length !== expected) {
    throw bad(`${answer.results.length} rerank results for a request of ${count} documents` +
      (body.top_n === undefined ? '' : ` and top_n ${body.top_n}`) + `, not ${expected}`);
  }
  const seen = new Set();
  const rankings = [];
  for (const result of answer.results) {
    const index = result?.index;
    if (!Number.isInteger(index) || index < 0 || index >= count) {
      throw bad(`rerank result index ${JSON.stringify(index)} is not one of the request's ${count} documents`);
    }
    if (seen.has(index)) throw bad(`rerank result index ${index} appears twice`);
    seen.add(index);
    if (!Number.isFinite(result.relevance_score)) throw bad(`rerank result ${index} has no finite relevance_score`);
    rankings.push({ index: first + index, score: result.relevance_score, document: documents[first + index] });
  }
  return rankings;
}

/** The kind ('reranker', 'embedding') of the served model answering as `model`. */
export function kindOf(info, model) {
  return (modelEntry(info, model) ?? info)?.kind;
}

/** Best first (ties: the earlier document), at most topN, with the result's provenance. */
export function ranked(rankings, topN, model, backend, method, source) {
  const order = [...rankings].sort((a, b) => (b.score - a.score) || (a.index - b.index));
  const result = topN === undefined ? order : order.slice(0, topN);
  Object.defineProperties(result, {
    model: { value: model, enumerable: false },
    backend: { value: backend, enumerable: false },
    method: { value: method, enumerable: false },
    source: { value: source, enumerable: false },
  });
  return result;
}

/** Cosine similarity, summed left to right as embedserve.vectors.cosine sums it. */
export function cosine(a, b) {
  let dot = 0;
  let normA = 0;
  let normB = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    normA += a[i] * a[i];
    normB += b[i] * b[i];
  }
  if (!normA || !normB) return 0;
  return dot / (Math.sqrt(normA) * Math.sqrt(normB));
}

/** The fallback's rankings: each document's cosine similarity to the query (vectors[0]). */
export function byCosine(vectors, documents) {
  const [query, ...others] = vectors;
  return others.map((vector, index) => ({ index, score: cosine(query, vector), document: documents[index] }));
}
