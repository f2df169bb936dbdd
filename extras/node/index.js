// embedserve for Node.js: a client that finds or starts a local embedserve server and
// embeds texts over HTTP, plus the hash embedding in JavaScript. No dependencies.

export { EmbedServeClient, NomicEmbedder } from './lib/client.js';
export { DEFAULT_URL } from './lib/options.js';
export { EmbedServeError, ERROR_CODES } from './lib/errors.js';
export {
  DEFAULT_DIMENSIONS,
  HASH_VERSION,
  HashEmbedder,
  crc32,
  hashEmbed,
  hashModelName,
  tokenize,
} from './lib/hash.js';
