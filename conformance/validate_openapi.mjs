#!/usr/bin/env node
// Validates an OpenAPI document against the official OpenAPI JSON schema of its version
// (@seriousme/openapi-schema-validator: 2.0, 3.0, 3.1, 3.2) and checks that every operationId is
// unique, which the OpenAPI specification requires but its schema cannot express.
// Usage: node validate_openapi.mjs FILE   -> prints {"valid", "version", "errors"}; exit 0/1 (2: usage).

import fs from 'node:fs';
import { Validator } from '@seriousme/openapi-schema-validator';

async function main() {
  const file = process.argv[2];
  if (!file) {
    process.stderr.write('usage: node validate_openapi.mjs FILE\n');
    return 2;
  }
  const spec = JSON.parse(fs.readFileSync(file, 'utf8'));
  const validator = new Validator();
  const result = await validator.validate(spec);
  const errors = result.valid ? [] : (Array.isArray(result.errors) ? result.errors : [result.errors]).map((e) =>
    typeof e === 'string' ? e : `${e.instancePath ?? ''} ${e.message ?? JSON.stringify(e)}`.trim());
  const seen = new Map();
  for (const [path, item] of Object.entries(spec.paths ?? {})) {
    for (const [method, op] of Object.entries(item)) {
      if (op && typeof op === 'object' && typeof op.operationId === 'string') {
        const where = `${method.toUpperCase()} ${path}`;
        if (seen.has(op.operationId)) errors.push(`duplicate operationId ${op.operationId}: ${seen.get(op.operationId)} and ${where}`);
        else seen.set(op.operationId, where);
      }
    }
  }
  process.stdout.write(JSON.stringify({ valid: errors.length === 0, version: validator.version, operations: seen.size, errors }) + '\n');
  return errors.length ? 1 : 0;
}

process.exitCode = await main();
