// The ready line is a contract between processes (embedserve/contracts.py): this parser
// must read the shared samples exactly as the Python one does (tests/test_contracts.py).

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { parseReadyLine } from '../lib/server-process.js';

const SAMPLES = JSON.parse(
  readFileSync(new URL('../../../tests/data/ready_lines.json', import.meta.url), 'utf8'),
);

test('ready-line samples parse as in Python', () => {
  assert.ok(SAMPLES.cases.length >= 5);
  for (const { line, parsed } of SAMPLES.cases) {
    assert.deepEqual(parseReadyLine(line), parsed, line);
  }
});
