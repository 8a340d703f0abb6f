// PROOF OF CONCEPT, not part of lkrun: runs an unmodified agents-js app (the default export of
// defineAgent) as an lkrun command agent, `node shim.mjs app.mjs`. It does in one process what
// agents-js's own job process (ipc/job_proc_lazy_main) does, speaking lkrun's job pipe protocol
// (docs/protocol.md) on stdin/stdout instead of Node's IPC channel. It leans on agents-js
// internals (see README.md); tried with @livekit/agents 1.9.0 only.
import { createInterface } from 'node:readline';
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

// stdout is the protocol's: what else is printed goes to stderr, the job's log. Done before
// the SDKs load, hence the dynamic imports.
const protocol = process.stdout.write.bind(process.stdout);
process.stdout.write = process.stderr.write.bind(process.stderr);
process.stdout.on('error', () => {}); // EPIPE once the daemon is gone: nobody to tell
const send = (type, fields = {}) =>
  new Promise((done) => protocol(JSON.stringify({ type, ...fields }) + '\n', () => done()));

const PROTOCOL = 1;
const agents = await import('@livekit/agents');
const { Room, RoomEvent, dispose } = await import('@livekit/rtc-node');
const { Job } = await import('@livekit/protocol');
agents.initializeLogger({ pretty: false, level: process.env.LOG_LEVEL ?? 'info' });

// Importing the app runs its `cli.runApp(...)` as well: with argv as the shim's it does
// nothing (agents-js's own job process imports the app the same way).
const mod = await import(pathToFileURL(resolve(process.argv[2] ?? 'app.mjs')).href);
const agent = agents.isAgent(mod.default) ? mod.default : mod.default?.default;
if (!agents.isAgent(agent)) {
  await send('done', { ok: false, error: `${process.argv[2]}: no defineAgent default export` });
  process.exit(1);
}
const proc = new agents.JobProcess(); // @internal
await (agent.prewarm ?? agents.defaultInitializeProcessFunc)(proc);

let started = false;
let closing = null;
let closed;
const close = new Promise((done) => (closed = done));
const end = (reason) => {
  if (closing !== null) return;
  closing = reason;
  closed(reason);
};
// No inference process: an app using the turn detector plugin fails its job.
const inference = { doInference: async (method) => Promise.reject(new Error(`no ${method}`)) };

async function run(start) {
  if (start.protocol !== PROTOCOL) {
    const error = `the daemon speaks job protocol ${start.protocol}; this shim ${PROTOCOL}`;
    await send('done', { ok: false, error, reason: '' });
    process.exit(1);
  }
  const info = {
    acceptArguments: {
      name: start.name ?? '',
      identity: start.identity,
      metadata: start.metadata ?? '',
      attributes: start.attributes ?? {},
    },
    job: Job.fromJson(start.job, { ignoreUnknownFields: true }),
    url: start.url,
    token: start.token,
    workerId: start.worker_id ?? '',
  };
  const room = new Room();
  room.on(RoomEvent.Disconnected, () => end('room disconnected'));
  // @internal: the constructor and its argument order.
  const onShutdown = (why) => end(why || 'shutdown');
  const ctx = new agents.JobContext(proc, info, room, () => {}, onShutdown, inference);
  await send('running', { ts: Date.now() / 1000 });
  let error = '';
  agents
    .runWithJobContextAsync(ctx, () => agent.entry(ctx)) // @internal
    .catch((e) => {
      error = `entrypoint failed: ${e?.message ?? e}`;
      end('entrypoint failed');
    });
  const reason = await close;
  // What agents-js's job_lifecycle does at the end (not exported): session, room, callbacks.
  await ctx._primaryAgentSession?.close().catch(() => {});
  await room.disconnect().catch(() => {});
  await Promise.allSettled(ctx.shutdownCallbacks.map((cb) => Promise.resolve().then(cb)));
  await send('done', { ok: !error, error, reason });
  // Without it the leave sometimes has not reached the server at the exit (`leaves` failed
  // in 2 runs of 5): the participant then stays until the server times it out.
  await dispose();
  process.exit(error ? 1 : 0);
}

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
lines.on('line', (line) => {
  let msg;
  try {
    msg = JSON.parse(line);
  } catch {
    return console.error('ignored a line that is not JSON');
  }
  if (msg === null || typeof msg !== 'object') return;
  if (msg.type === 'start' && !started && closing === null) {
    started = true;
    run(msg).catch((e) => console.error('the job failed:', e));
  } else if (msg.type === 'shutdown') {
    if (!started) process.exit(0); // stopped before its job: nothing to report
    end(msg.reason || 'shutdown');
  }
});
lines.on('close', () => (started ? end('daemon went away') : process.exit(0)));
await send('ready', { protocol: PROTOCOL, pid: process.pid, ts: Date.now() / 1000, warm: true });
