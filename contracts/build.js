#!/usr/bin/env node
// Compiles contracts/ with the pinned solc-js and writes one deterministic JSON artifact per
// deployable contract. Usage: node contracts/build.js [output-directory]
// (default ravenp2p/chain/artifacts). Test-only contracts (contracts/test/) land in <out>/test/.
"use strict";

const crypto = require("crypto");
const fs = require("fs");
const path = require("path");

const ROOT = path.resolve(__dirname, "..");
const CONTRACTS_DIR = path.join(ROOT, "contracts");
const NODE_MODULES = path.join(ROOT, "node_modules");
const DEFAULT_OUT = path.join(ROOT, "ravenp2p", "chain", "artifacts");

// Everything that changes the bytecode is pinned here and recorded in each artifact.
const SETTINGS = {
  evmVersion: "prague",
  metadata: { bytecodeHash: "none" },
  optimizer: { enabled: true, runs: 200 },
  viaIR: false,
};

function fail(message) {
  process.stderr.write(`contracts/build.js: ${message}\n`);
  process.exit(1);
}

function loadSolc() {
  try {
    return require(path.join(NODE_MODULES, "solc"));
  } catch (err) {
    fail(`cannot load the solc compiler from node_modules (run \`npm ci\`): ${err.message}`);
  }
}

function sha256(text) {
  return crypto.createHash("sha256").update(text).digest("hex");
}

/** Source unit names (POSIX paths relative to the repository root) of every .sol file here. */
function ownSources(dir) {
  const found = [];
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) found.push(...ownSources(full));
    else if (entry.isFile() && entry.name.endsWith(".sol")) {
      found.push(path.relative(ROOT, full).split(path.sep).join("/"));
    }
  }
  return found.sort();
}

/** Where a source unit name lives on disk: our contracts, or an npm package's file. */
function sourceFile(unitName) {
  const base = unitName.startsWith("contracts/") ? ROOT : NODE_MODULES;
  const full = path.resolve(base, unitName);
  if (!full.startsWith(base + path.sep)) fail(`import escapes its root: ${unitName}`);
  return full;
}

/** Recursively sorted keys, so JSON.stringify output does not depend on insertion order. */
function canonical(value) {
  if (Array.isArray(value)) return value.map(canonical);
  if (value !== null && typeof value === "object") {
    const out = {};
    for (const key of Object.keys(value).sort()) out[key] = canonical(value[key]);
    return out;
  }
  return value;
}

function compile(solc, units) {
  const contents = new Map();
  const read = (unitName) => {
    if (!contents.has(unitName)) {
      contents.set(unitName, fs.readFileSync(sourceFile(unitName), "utf8"));
    }
    return contents.get(unitName);
  };
  const sources = {};
  for (const unit of units) sources[unit] = { content: read(unit) };
  const input = {
    language: "Solidity",
    sources,
    settings: {
      ...SETTINGS,
      outputSelection: {
        "*": {
          "": ["ast"],
          "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object", "metadata"],
        },
      },
    },
  };
  const findImports = (unitName) => {
    try {
      return { contents: read(unitName) };
    } catch (err) {
      return { error: `not found: ${unitName} (${err.code || err.message})` };
    }
  };
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
  const problems = output.errors || [];
  for (const problem of problems.filter((p) => p.severity !== "error")) {
    process.stderr.write(problem.formattedMessage || `${problem.message}\n`);
  }
  const errors = problems.filter((p) => p.severity === "error");
  if (errors.length > 0) {
    for (const error of errors) {
      process.stderr.write(error.formattedMessage || `${error.message}\n`);
    }
    fail(`compilation failed with ${errors.length} error(s)`);
  }
  return { output, contents };
}

/** Names of the contracts (not libraries or interfaces) a source unit defines. */
function deployableContracts(ast) {
  return ast.nodes
    .filter((node) => node.nodeType === "ContractDefinition")
    .filter((node) => node.contractKind === "contract" && !node.abstract)
    .map((node) => node.name);
}

function artifactFor(solc, unit, name, compiled, contents) {
  const contract = compiled.contracts[unit][name];
  const metadata = JSON.parse(contract.metadata);
  const sources = {};
  for (const used of Object.keys(metadata.sources)) sources[used] = sha256(contents.get(used));
  const digestInput = Object.keys(sources)
    .sort()
    .map((used) => `${used}:${sources[used]}\n`)
    .join("");
  return {
    abi: contract.abi,
    bytecode: `0x${contract.evm.bytecode.object}`,
    compiler: { settings: SETTINGS, version: solc.version() },
    contractName: name,
    deployedBytecode: `0x${contract.evm.deployedBytecode.object}`,
    sourceDigest: sha256(digestInput),
    sourceName: unit,
    sources,
  };
}

/** Removes earlier artifacts this build no longer produces (files it did not write are kept). */
function removeStale(dir, written) {
  if (!fs.existsSync(dir)) return;
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) removeStale(full, written);
    else if (entry.name.endsWith(".json") && !written.has(full)) {
      let old;
      try {
        old = JSON.parse(fs.readFileSync(full, "utf8"));
      } catch {
        continue;
      }
      if (old && typeof old === "object" && "contractName" in old && "sourceDigest" in old) {
        fs.unlinkSync(full);
        process.stderr.write(`removed stale artifact ${full}\n`);
      }
    }
  }
}

function main() {
  const args = process.argv.slice(2);
  if (args.length > 1) fail("usage: node contracts/build.js [output-directory]");
  const outDir = path.resolve(args[0] || DEFAULT_OUT);
  const solc = loadSolc();
  const units = ownSources(CONTRACTS_DIR);
  if (units.length === 0) fail(`no .sol files under ${CONTRACTS_DIR}`);
  const { output, contents } = compile(solc, units);

  const written = new Set();
  for (const unit of units) {
    const relative = path.posix.dirname(path.posix.relative("contracts", unit));
    const targetDir = relative === "." ? outDir : path.join(outDir, ...relative.split("/"));
    for (const name of deployableContracts(output.sources[unit].ast)) {
      const file = path.join(targetDir, `${name}.json`);
      if (written.has(file)) fail(`two contracts would both write ${file}`);
      const artifact = artifactFor(solc, unit, name, output, contents);
      fs.mkdirSync(targetDir, { recursive: true });
      fs.writeFileSync(file, `${JSON.stringify(canonical(artifact), null, 2)}\n`);
      written.add(file);
    }
  }
  removeStale(outDir, written);
  process.stdout.write(`wrote ${written.size} artifact(s) to ${outDir}\n`);
}

main();
