// The ready line is a contract between processes (embedserve/contracts.py): this parser
// must read the shared samples exactly as the Python one does (tests/test_contracts.py).

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { parseReadyLine } from '../lib/server-process.js';
import { resolveOptions } from '../lib/options.js';

const SAMPLES = JSON.parse(
  readFileSync(new URL('../../../tests/data/ready_lines.json', import.meta.url), 'utf8'),
);

// lastseen's shared file keys a server by its name: both clients must write it alike.
const SERVER_URLS = JSON.parse(
  readFileSync(new URL('../../../tests/data/server_urls.json', import.meta.url), 'utf8'),
);

test('a server is named as the Python client names it, however its URL is spelled', () => {
  assert.ok(SERVER_URLS.cases.length >= 10);
  for (const { url, name } of SERVER_URLS.cases) {
    assert.equal(resolveOptions({ url }).target.base, name, url);
  }
});

test('ready-line samples parse as in Python', () => {
  assert.ok(SAMPLES.cases.length >= 5);
  for (const { line, parsed } of SAMPLES.cases) {
    assert.deepEqual(parseReadyLine(line), parsed, line);
  }
});
