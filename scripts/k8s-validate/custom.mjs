// Validates custom resources (KEDA, Prometheus Operator) against the JSON schemas that the
// kubernetes-models packages of package.json compile from those projects' API types, the
// types their CRDs are generated from. Run by scripts/validate-k8s.sh:
//
//     node custom.mjs NODE_MODULES_DIR < custom.json     (a list of {overlay, object})
//
// The compiled schemas do not refuse unknown fields, and a misspelt field (`minReplicaCont`)
// is one the API server prunes from a custom resource with a warning at most. So the object
// is validated through proxies that note every field the validator reads; a field it never
// read is one the schema does not have, and is reported as `kubernetes-validate --strict`
// reports one.
// A kind without a package is an error, never a silent pass.

import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const PACKAGES = {
  "keda.sh": "@kubernetes-models/keda",
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
};

const modules = process.argv[2];
const items = JSON.parse(readFileSync(0, "utf8"));

// The model class of a kind (<package>/<group>/<version>/<Kind>.js) imports its compiled
// schema from _schemas/; the packages export neither by name, so it is found from the file.
async function validatorFor(apiVersion, kind) {
  const [group, version] = apiVersion.split("/");
  const pkg = PACKAGES[group];
  if (!pkg) return { error: `no schema package for API group ${group}` };
  const dir = join(modules, pkg);
  let model;
  try {
    model = readFileSync(join(dir, group, version, `${kind}.js`), "utf8");
  } catch {
    return { error: `${pkg} has no ${kind} in ${apiVersion}` };
  }
  const schema = model.match(/from\s*"(\.\.\/\.\.\/_schemas\/[^"]+\.js)"/);
  if (!schema) return { error: `${pkg}: no schema import in ${group}/${version}/${kind}.js` };
  const { validate } = await import(pathToFileURL(join(dir, group, version, schema[1])).href);
  const { version: pkgVersion } = JSON.parse(readFileSync(join(dir, "package.json"), "utf8"));
  return { validate, source: `${pkg}@${pkgVersion}` };
}

// Wraps the object so that every property the validator reads is noted per object.
function tracking(root) {
  const proxies = new Map();
  const read = new Map();
  const wrap = (value) => {
    if (value === null || typeof value !== "object") return value;
    if (proxies.has(value)) return proxies.get(value);
    const seen = new Set();
    read.set(value, seen);
    const proxy = new Proxy(value, {
      get(target, key, receiver) {
        if (typeof key === "string") seen.add(key);
        return wrap(Reflect.get(target, key, receiver));
      },
      has(target, key) {
        if (typeof key === "string") seen.add(key);
        return Reflect.has(target, key);
      },
    });
    proxies.set(value, proxy);
    return proxy;
  };
  return { proxy: wrap(root), read };
}

function unknownFields(value, read, path, out) {
  if (value === null || typeof value !== "object") return out;
  if (Array.isArray(value)) {
    value.forEach((v, i) => unknownFields(v, read, `${path}/${i}`, out));
    return out;
  }
  const seen = read.get(value) ?? new Set();
  for (const [key, v] of Object.entries(value)) {
    if (!seen.has(key)) out.push(`${path}/${key}: unknown field`);
    else unknownFields(v, read, `${path}/${key}`, out);
  }
  return out;
}

// The packages compile their schemas without messages; say what each keyword wanted.
function describe({ keyword, params, message }) {
  if (message) return message;
  switch (keyword) {
    case "type": return `must be ${params.type}`;
    case "required": return `must have ${params.missingProperty}`;
    case "enum": return `must be one of ${params.allowedValues.join(", ")}`;
    case "pattern": return `must match ${params.pattern}`;
    case "format": return `must be of format ${params.format}`;
    default: return `fails ${keyword} ${JSON.stringify(params)}`;
  }
}

let failed = 0;
for (const { overlay, object } of items) {
  const name = `${object.kind}/${object.metadata?.name ?? "?"}`;
  const found = await validatorFor(object.apiVersion ?? "", object.kind ?? "");
  if (found.error) {
    console.error(`ERROR ${overlay}: ${name}: ${found.error}`);
    failed++;
    continue;
  }
  const { proxy, read } = tracking(object);
  const valid = found.validate(proxy);
  const problems = (valid ? [] : found.validate.errors.map((e) => `${e.instancePath || "/"}: ${describe(e)}`))
    .concat(unknownFields(object, read, "", []));
  if (problems.length) {
    for (const p of problems) console.error(`ERROR ${overlay}: ${name}: ${p} (${found.source})`);
    failed++;
  } else {
    console.log(`INFO ${overlay}: ${name} (${object.apiVersion}) passed against ${found.source}`);
  }
}
process.exit(failed ? 1 : 0);
