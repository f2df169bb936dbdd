// What a server's /info says of one of its models.

/**
 * The entry of /info `models` for the served model whose answers carry the name `model`
 * (matched by any of its names, or its id), or undefined.
 */
export function modelEntry(info, model) {
  const wanted = model.toLowerCase();
  for (const entry of Array.isArray(info?.models) ? info.models : []) {
    const names = [...(Array.isArray(entry?.names) ? entry.names : []), entry?.model];
    if (names.some((name) => typeof name === 'string' && name.toLowerCase() === wanted)) return entry;
  }
  return undefined;
}
