// node-postgres (npm `pg`, pure JavaScript on libuv: extended-protocol queries go out in one
// writev of Parse/Bind/Describe/Execute/Sync, simple ones in one write; replies come in
// with read). The database family must see both on the wire.
//
// node pg_node_client.js HOST PORT SIMPLE EXTENDED [RELEASE_FILE] prints `ready PID`, waits
// for a line on stdin, then runs SIMPLE simple-protocol queries and EXTENDED parameterized
// ones (each sleeping 1 ms in the server, so the client's own overhead is small against the
// round trip), timing each with its own clock, and prints a JSON report (with the bytes its
// connection wrote and read). HOST is the
// server's socket directory or address. With RELEASE_FILE it keeps its connection open after
// the report until that file exists.
const { Client } = require('pg');

const [socketDir, port, simple, extended, releaseFile] = process.argv.slice(2);

async function main() {
  process.stdout.write(`ready ${process.pid}\n`);
  await new Promise((resolve) => process.stdin.once('data', resolve));
  process.stdin.pause();
  const client = new Client({ host: socketDir, port: Number(port), user: 'postgres', database: 'postgres' });
  await client.connect();
  let simpleNs = 0n;
  for (let i = 0; i < Number(simple); i++) {
    const start = process.hrtime.bigint();
    await client.query(`SELECT ${i} AS node_simple, pg_sleep(0.001)`);
    simpleNs += process.hrtime.bigint() - start;
  }
  let extendedNs = 0n;
  for (let i = 0; i < Number(extended); i++) {
    const start = process.hrtime.bigint();
    await client.query('SELECT $1::int AS node_extended, pg_sleep(0.001)', [i]);
    extendedNs += process.hrtime.bigint() - start;
  }
  process.stdout.write(JSON.stringify({
    simple: Number(simple),
    simple_ns: Number(simpleNs),
    extended: Number(extended),
    extended_ns: Number(extendedNs),
    // The connection's own byte counts (node's net.Socket), from its first byte.
    bytes_written: client.connection.stream.bytesWritten,
    bytes_read: client.connection.stream.bytesRead,
  }) + '\n');
  if (releaseFile) {
    const fs = require('fs');
    while (!fs.existsSync(releaseFile)) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
  await client.end();
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
