// Validates Prometheus operator objects (a JSON array on stdin) against the operator's CRD
// schemas, as packaged by @kubernetes-models/prometheus-operator. Prints one line per object;
// exits 1 if any is invalid or of a kind it has no schema for.
import { readFileSync } from "node:fs";
import * as v1 from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const objects = JSON.parse(readFileSync(0, "utf8"));
let failed = 0;
for (const object of objects) {
  const where = `${object.kind}/${object.metadata?.name}`;
  const Model = v1[object.kind];
  if (!Model || object.apiVersion !== Model.apiVersion) {
    console.log(`no schema: ${where} (${object.apiVersion})`);
    failed++;
    continue;
  }
  try {
    new Model(object).validate();
    console.log(`valid: ${where}`);
  } catch (error) {
    console.log(`invalid: ${where}: ${error.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
