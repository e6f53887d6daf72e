#!/usr/bin/env node
// A scripted session of a real third-party FHIR client (fhir-kit-client) against a running server:
// capabilities, create Patient, create Media with a chest X-ray, $analyze, search
// DiagnosticReport?patient=..., read every Observation of the report, the report's history and a
// vread, and a 404 that must come back as an OperationOutcome.
//
// Usage: node client_session.mjs BASE_URL IMAGE_FILE
// Output (stdout): one JSON object {"ok": bool, "steps": [{"name", "ok", "detail"}], "resources": [...]}
// where `resources` is every resource the server returned (for the caller's validators).
// Exit status 0 when every step passed, 1 otherwise, 2 on usage errors.

import fs from 'node:fs';
import path from 'node:path';
import { Client } from 'fhir-kit-client';

const CONTENT_TYPES = { '.png': 'image/png', '.jpg': 'image/jpeg', '.jpeg': 'image/jpeg', '.dcm': 'application/dicom' };

async function main() {
  const [baseUrl, imagePath] = process.argv.slice(2);
  if (!baseUrl || !imagePath) {
    process.stderr.write('usage: node client_session.mjs BASE_URL IMAGE_FILE\n');
    return 2;
  }
  const contentType = CONTENT_TYPES[path.extname(imagePath).toLowerCase()];
  if (!contentType) {
    process.stderr.write(`unsupported image type: ${imagePath}\n`);
    return 2;
  }
  const client = new Client({ baseUrl });
  const steps = [];
  const resources = [];
  const keep = (resource) => {
    if (resource && typeof resource === 'object' && resource.resourceType) resources.push(resource);
    return resource;
  };
  const step = async (name, fn) => {
    try {
      const detail = await fn();
      steps.push({ name, ok: true, detail: detail ?? '' });
      return true;
    } catch (err) {
      steps.push({ name, ok: false, detail: String(err?.message ?? err) + (err?.response ? ` ${JSON.stringify(err.response.data).slice(0, 500)}` : '') });
      return false;
    }
  };
  const expect = (condition, message) => {
    if (!condition) throw new Error(message);
  };

  let patient;
  let media;
  let report;
  await step('metadata', async () => {
    const cap = keep(await client.capabilityStatement());
    expect(cap.resourceType === 'CapabilityStatement', `got ${cap.resourceType}`);
    expect(cap.fhirVersion === '4.0.1', `fhirVersion ${cap.fhirVersion}`);
    const media = cap.rest?.[0]?.resource?.find((r) => r.type === 'Media');
    expect(media?.operation?.some((op) => op.name === 'analyze'), 'CapabilityStatement does not list Media $analyze');
    return `${cap.software?.name ?? ''} ${cap.software?.version ?? ''}`.trim();
  });
  await step('create Patient', async () => {
    patient = keep(await client.create({
      resourceType: 'Patient',
      body: { resourceType: 'Patient', name: [{ family: 'Kitclient', given: ['Session'] }], gender: 'male' },
    }));
    expect(patient.id && patient.meta?.versionId === '1', 'created Patient lacks id / meta.versionId 1');
    return `Patient/${patient.id}`;
  });
  await step('create Media with a chest X-ray', async () => {
    const data = fs.readFileSync(imagePath).toString('base64');
    media = keep(await client.create({
      resourceType: 'Media',
      body: {
        resourceType: 'Media',
        status: 'completed',
        modality: { coding: [{ system: 'http://dicom.nema.org/resources/ontology/DCM', code: 'DX' }] },
        subject: { reference: `Patient/${patient.id}` },
        content: { contentType, data, title: path.basename(imagePath) },
      },
    }));
    expect(media.id, 'created Media has no id');
    return `Media/${media.id} (${contentType}, ${data.length} base64 chars)`;
  });
  await step('$analyze', async () => {
    const bundle = keep(await client.operation({ name: '$analyze', resourceType: 'Media', id: media.id, method: 'POST' }));
    expect(bundle.resourceType === 'Bundle', `got ${bundle.resourceType}`);
    for (const entry of bundle.entry ?? []) keep(entry.resource);
    const types = (bundle.entry ?? []).map((e) => e.resource.resourceType);
    expect(types[0] === 'DiagnosticReport', `first entry is ${types[0]}`);
    return types.join(', ');
  });
  await step('search DiagnosticReport?patient=', async () => {
    const bundle = keep(await client.search({ resourceType: 'DiagnosticReport', searchParams: { patient: patient.id } }));
    expect(bundle.type === 'searchset', `Bundle.type ${bundle.type}`);
    const reports = (bundle.entry ?? []).map((e) => keep(e.resource)).filter((r) => r.resourceType === 'DiagnosticReport');
    expect(reports.length === 1, `expected 1 DiagnosticReport for the patient, got ${reports.length}`);
    expect(bundle.total === undefined || bundle.total === 1, `total ${bundle.total}`);
    report = reports[0];
    expect(report.subject?.reference === `Patient/${patient.id}`, `subject ${report.subject?.reference}`);
    return `DiagnosticReport/${report.id} status=${report.status}`;
  });
  await step('read the Observations', async () => {
    const refs = (report.result ?? []).map((r) => r.reference);
    expect(refs.length > 0, 'the report has no result');
    for (const ref of refs) {
      const [resourceType, id] = ref.split('/');
      const obs = keep(await client.read({ resourceType, id }));
      expect(obs.resourceType === 'Observation' && obs.id === id, `read ${ref} gave ${obs.resourceType}/${obs.id}`);
    }
    return `${refs.length} Observations`;
  });
  await step('history and vread', async () => {
    const history = keep(await client.history({ resourceType: 'DiagnosticReport', id: report.id }));
    expect(history.type === 'history', `Bundle.type ${history.type}`);
    for (const entry of history.entry ?? []) keep(entry.resource);
    const version = history.entry?.[0]?.resource?.meta?.versionId;
    expect(version, 'history entry without meta.versionId');
    const old = keep(await client.vread({ resourceType: 'DiagnosticReport', id: report.id, version }));
    expect(old.meta?.versionId === version, `vread gave version ${old.meta?.versionId}`);
    return `${history.entry.length} version(s)`;
  });
  await step('missing resource -> 404 OperationOutcome', async () => {
    try {
      await client.read({ resourceType: 'Observation', id: 'no-such-observation' });
    } catch (err) {
      expect(err.response?.status === 404, `status ${err.response?.status}`);
      expect(keep(err.response.data)?.resourceType === 'OperationOutcome', 'error body is not an OperationOutcome');
      return '404';
    }
    throw new Error('reading a missing resource succeeded');
  });

  const ok = steps.every((s) => s.ok);
  process.stdout.write(JSON.stringify({ ok, steps, resources }) + '\n');
  return ok ? 0 : 1;
}

process.exitCode = await main();
