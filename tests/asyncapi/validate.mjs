// Parse an AsyncAPI document with the official parser and print, as JSON on stdout, what
// tests/unit/test_asyncapi.py checks: channels, operations, messages with their payload schema
// as the parser resolved it (relative $ref files included) and their examples.
// Usage: node validate.mjs PATH. Diagnostics go to stderr; exit 1 if any is an error.
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { Parser, fromFile } from '@asyncapi/parser';

const SEVERITY = ['error', 'warning', 'info', 'hint']; // @stoplight/types DiagnosticSeverity

const fail = (message) => {
  console.error(message);
  process.exit(1);
};

if (process.argv.length !== 3) fail('usage: node validate.mjs PATH/TO/asyncapi.yaml');
const major = Number(process.versions.node.split('.')[0]);
if (major < 20) fail(`Node.js ${process.versions.node} is too old: the parser needs 20 or later`);
const path = resolve(process.argv[2]);

let parsed;
try {
  parsed = await fromFile(new Parser(), path).parse();
} catch (err) {
  fail(`${path}: ${err.message}`);
}
const { document, diagnostics } = parsed;

for (const d of diagnostics) {
  const where = d.path?.length ? ` at ${d.path.join('.')}` : '';
  console.error(`${SEVERITY[d.severity] ?? d.severity} ${d.code}${where}: ${d.message}`);
}
const errors = diagnostics.filter((d) => d.severity === 0).length;
if (errors || !document) fail(`${path}: ${errors} error(s), not a valid AsyncAPI document`);

const parserVersion = JSON.parse(
  readFileSync(new URL('node_modules/@asyncapi/parser/package.json', import.meta.url), 'utf8'),
).version;

const bindings = (model) =>
  Object.fromEntries(model.bindings().all().map((b) => [b.protocol(), b.json()]));

const report = {
  parser_version: parserVersion,
  asyncapi: document.version(),
  extensions: Object.fromEntries(document.extensions().all().map((e) => [e.id(), e.value()])),
  channels: document.channels().all().map((channel) => ({
    id: channel.id(),
    address: channel.address(),
    parameters: Object.fromEntries(channel.parameters().all().map((p) => [p.id(), p.json()])),
    messages: channel.messages().all().map((m) => m.id()),
    bindings: bindings(channel),
  })),
  operations: document.operations().all().map((op) => ({
    id: op.id(),
    action: op.action(),
    channels: op.channels().all().map((c) => c.id()),
    messages: op.messages().all().map((m) => m.id()),
    bindings: bindings(op),
  })),
  messages: document.messages().all().map((m) => ({
    id: m.id(),
    name: m.name() ?? null,
    content_type: m.contentType() ?? null,
    correlation_id: m.hasCorrelationId() ? m.correlationId().location() : null,
    payload: m.hasPayload() ? m.payload().json() : null,
    examples: m.examples().all().map((e) => ({ name: e.name() ?? null, payload: e.payload() })),
  })),
};
process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
