#!/usr/bin/env bash
# Rebuild TestUSDC.json (ABI + creation bytecode) from TestUSDC.sol with the pinned solcjs
# from the repo's package-lock.json. Usage: bash devnet/contracts/build.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
if [ ! -d node_modules/solc ]; then
  npm ci --no-audit --no-fund
fi
node - "$here/TestUSDC.sol" "$here/TestUSDC.json" <<'JS'
const fs = require('fs');
const path = require('path');
const solc = require(path.join(process.cwd(), 'node_modules', 'solc'));
const [src, out] = process.argv.slice(2);
const input = {
  language: 'Solidity',
  sources: { 'TestUSDC.sol': { content: fs.readFileSync(src, 'utf8') } },
  settings: {
    // shanghai: runs on both eth-tester's py-evm (Prague) and anvil.
    evmVersion: 'shanghai',
    optimizer: { enabled: true, runs: 200 },
    outputSelection: { '*': { TestUSDC: ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] } },
  },
};
const result = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (result.errors || []).filter((e) => e.severity === 'error');
for (const e of result.errors || []) console.error(e.formattedMessage);
if (errors.length > 0) process.exit(1);
const c = result.contracts['TestUSDC.sol'].TestUSDC;
const artifact = {
  contractName: 'TestUSDC',
  compiler: `solc ${solc.version()}`,
  evmVersion: input.settings.evmVersion,
  optimizer: input.settings.optimizer,
  abi: c.abi,
  bytecode: '0x' + c.evm.bytecode.object,
  deployedBytecode: '0x' + c.evm.deployedBytecode.object,
};
fs.writeFileSync(out, JSON.stringify(artifact, null, 2) + '\n');
console.log(`wrote ${out} (${c.evm.bytecode.object.length / 2} bytes of creation code)`);
JS
