// rerank(): the server's ranking with its provenance, against a real hash-tier server, and
// the in-process fallback, whose scores equal the server's hash tier's bit for bit, under
// embed's same-model rule (never in place of a server's reranker).

import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { after, before, test } from 'node:test';
import { EmbedServeClient } from '../index.js';
import { Fallback } from '../lib/fallback.js';
import { clientOptions, freePort, startServer } from '../test-support/helpers.js';

const QUERY = 'how do cats sleep';
const DOCUMENTS = ['dogs bark at night', 'cats sleep all day long', 'a cat sleeps on the mat',
  'stock markets fell', 'sleep well'];

let server;
before(async () => { server = await startServer(['--max-rerank-documents', '2']); });
after(async () => { await server?.stop(); });

/** The server's own answer to a whole request (each request within its limit of 2). */
async function servedScores() {
  const scores = new Map();
  for (let first = 0; first < DOCUMENTS.length; first += 2) {
    const response = await fetch(`${server.url}/v2/rerank`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ query: QUERY, documents: DOCUMENTS.slice(first, first + 2) }),
    });
    assert.equal(response.status, 200);
    for (const r of (await response.json()).results) scores.set(first + r.index, r.relevance_score);
  }
  return scores;
}

test('rerank gives the server\'s ranking, split at its document limit, with provenance', async () => {
  const client = new EmbedServeClient(clientOptions({ url: server.url, autoStart: false, fallback: 'never' }));
  try {
    const result = await client.rerank(QUERY, DOCUMENTS, { topN: 3 });
    const scores = await servedScores();
    const order = [...scores.keys()].sort((a, b) => (scores.get(b) - scores.get(a)) || (a - b));
    assert.deepEqual(result.map((r) => r.index), order.slice(0, 3));
    for (const r of result) {
      assert.equal(r.score, scores.get(r.index));
      assert.equal(r.document, DOCUMENTS[r.index]);
    }
    assert.deepEqual([result.model, result.backend, result.method, result.source],
      ['hash-v1-384', 'hash', 'embeddings', 'server']);
    await assert.rejects(client.rerank('', DOCUMENTS), { code: 'validation' });
    await assert.rejects(client.rerank(QUERY, DOCUMENTS, { topN: 0 }), { code: 'validation', status: 422 });
  } finally {
    await client.close();
  }
});

test('the fallback ranks as the hash-tier server does, bit for bit', async () => {
  const port = await freePort();
  const client = new EmbedServeClient(clientOptions({
    url: `http://127.0.0.1:${port}`, autoStart: false, retries: 0, backend: 'hash',
  }));
  try {
    const result = await client.rerank(QUERY, DOCUMENTS);
    assert.deepEqual([result.model, result.method, result.source], ['hash-v1-384', 'embeddings', 'fallback']);
    const scores = await servedScores();
    for (const r of result) assert.equal(r.score, scores.get(r.index));
    await assert.rejects(client.rerank(QUERY, DOCUMENTS, { model: 'bge-reranker-base' }),
      (error) => error.serverUnavailable && /only the hash tier/.test(error.message));
  } finally {
    await client.close();
  }
});

test('the fallback never stands in for a server\'s reranker under same-model', () => {
  const info = {
    model: 'hash-v1-384', dimensions: 384, backend: 'hash', models: [
      { names: ['hash-v1-384'], model: 'hash-v1-384', kind: 'embedding', backend: 'hash', dimensions: 384 },
      { names: ['reranker'], model: '/models/reranker', kind: 'reranker', backend: 'sentence-transformers', dimensions: 2 },
    ],
  };
  const sameModel = new Fallback({ fallback: 'same-model', encodingFormat: 'base64' }, {});
  sameModel.learn(info);
  assert.match(sameModel.rerankPlan(undefined).refusal, /reranks with reranker/);
  assert.equal(sameModel.rerankPlan('hash-v1-384').label, 'hash-v1-384');
  const always = new Fallback({ fallback: 'always', encodingFormat: 'base64' }, {});
  always.learn(info);
  assert.equal(always.rerankPlan(undefined).label, 'hash-v1-384');
});

test('a rerank answer that does not rank every document of its request exactly once is a bad_response', { timeout: 20_000 }, async () => {
  // Accepted before: a negative index (no document), one document twice, another missing.
  let results;
  const peer = createServer((req, res) => {
    const reply = (body) => {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(body));
    };
    if (req.url === '/health') return reply({ status: 'ok' });
    if (req.url === '/info') {
      return reply({ backend: 'hash', model: 'hash-v1-4', dimensions: 4, kind: 'embedding', max_rerank_documents: 3 });
    }
    let body = '';
    req.on('data', (chunk) => { body += chunk; });
    req.on('end', () => {
      const { documents } = JSON.parse(body);
      reply({ id: 'x', model: 'hash-v1-4', results: results(documents.length) });
    });
  });
  await new Promise((resolve) => peer.listen(0, '127.0.0.1', resolve));
  const url = `http://127.0.0.1:${peer.address().port}`;
  const client = new EmbedServeClient({ url, autoStart: false, fallback: 'never' });
  const docs = ['doc A', 'doc B', 'doc C', 'doc D']; // requests of 3 and 1 documents
  const scored = (indexes) => indexes.map((index, i) => ({ index, relevance_score: 1 - i / 10 }));
  try {
    const bad = [
      [() => scored([-1, 0, 0]), /index -1 is not one of the request's 3 documents/],
      [() => scored([0, 0, 1]), /index 0 appears twice/],
      [() => scored([2, 1]), /2 rerank results for a request of 3 documents, not 3/],
      [() => scored([2, 1, 0, 0]), /4 rerank results/],
      [(n) => scored(n === 3 ? [0, 1, 2] : [1]), /index 1 is not one of the request's 1 documents/],
      [() => scored([0.5, 1, 2]), /index 0.5 is not one/],
      [() => scored(['0', 1, 2]), /index "0" is not one/],
    ];
    for (const [make, message] of bad) {
      results = make;
      await assert.rejects(client.rerank('q', docs), (error) => {
        assert.equal(error.code, 'bad_response');
        assert.ok(error.message.includes(url), error.message);
        assert.match(error.message, message);
        return true;
      });
    }
    results = (n) => scored(n === 3 ? [2, 0, 1] : [0]);
    const ranking = await client.rerank('q', docs, { topN: 3 });
    assert.deepEqual(ranking.map((r) => r.document), ['doc C', 'doc D', 'doc A']);
  } finally {
    await client.close();
    peer.closeAllConnections();
    await new Promise((resolve) => peer.close(resolve));
  }
});
