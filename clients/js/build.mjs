// Bundle the client and @msgpack/msgpack into one ES module that the relay
// serves at /client.js, so a page needs no build step and the Python package
// needs no npm at runtime. `node build.mjs` writes it; `node build.mjs --check`
// fails if the committed file is not what the sources build to.

import { readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';

export const OUTFILE = fileURLToPath(new URL('../../relay/static/client.js', import.meta.url));

const require = createRequire(import.meta.url);
const msgpackDir = dirname(require.resolve('@msgpack/msgpack/package.json'));
const msgpack = JSON.parse(readFileSync(join(msgpackDir, 'package.json'), 'utf8'));

/** Says what the file is, and carries msgpack's license, which asks to travel with copies. */
function banner() {
  const license = readFileSync(join(msgpackDir, 'LICENSE'), 'utf8').trim();
  return [
    "// Generated from clients/js/src by 'npm run build' in clients/js: do not edit.",
    `// Includes @msgpack/msgpack ${msgpack.version}, under this license:`,
    '/*',
    ...license.split('\n').map((line) => ` ${line}`.trimEnd()),
    ' */',
  ].join('\n');
}

/** The bundle's text. */
export async function bundle() {
  const result = await esbuild.build({
    // Paths in the bundle's comments are relative to this; fixed, so the output does not depend on the cwd.
    absWorkingDir: fileURLToPath(new URL('.', import.meta.url)),
    entryPoints: ['src/client.js'],
    bundle: true,
    format: 'esm',
    target: 'es2022',
    legalComments: 'inline',
    banner: { js: banner() },
    write: false,
    logLevel: 'silent',
  });
  return result.outputFiles[0].text;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const text = await bundle();
  if (process.argv.includes('--check')) {
    if (readFileSync(OUTFILE, 'utf8') !== text) {
      console.error(`${OUTFILE} is out of date: run 'npm run build' in clients/js`);
      process.exit(1);
    }
  } else {
    writeFileSync(OUTFILE, text);
    console.log(`wrote ${OUTFILE} (${text.length} bytes)`);
  }
}
