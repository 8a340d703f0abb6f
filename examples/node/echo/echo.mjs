// Echo in Node: joins the room it was dispatched to and sends every data message back to its
// sender, like lkrun/examples/echo.py. An lkrun command agent speaking the job pipe protocol
// (docs/protocol.md): JSON lines from the daemon on stdin, to it on stdout; stderr is the log.
import { createInterface } from 'node:readline';

// stdout carries the protocol only: whatever else is printed (console.log, and the SDK's
// logger, which writes to a replaced process.stdout.write) goes to stderr, the job's log.
// Done before the SDK is imported, hence the dynamic import.
const protocol = process.stdout.write.bind(process.stdout);
process.stdout.write = process.stderr.write.bind(process.stderr);
const { Room, RoomEvent, dispose } = await import('@livekit/rtc-node');

const PROTOCOL = 1; // the job protocol's version this program speaks
const JOIN_GRACE_MS = 5000; // how long a join under way may take to finish when the job ends

// Resolves once the line is handed to the OS (process.exit would drop what is still queued).
// Once the daemon is gone the write fails (EPIPE): nobody is left to tell.
process.stdout.on('error', () => {});
const send = (type, fields = {}) =>
  new Promise((resolve) => protocol(JSON.stringify({ type, ...fields }) + '\n', () => resolve()));
const log = (...args) => console.error(...args);
const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

let room = null;
let joining = null; // the join, settled either way when it is over
let ending = null; // the first reason the job ends for

async function end(reason, error = '') {
  if (ending !== null) return;
  ending = reason;
  if (room === null) process.exit(0); // stopped before a job came: nothing to report
  // A room still connecting ignores disconnect(): let the join finish, then leave, or the
  // participant would stay in the room until the server times it out.
  await Promise.race([joining, delay(JOIN_GRACE_MS)]);
  await room.disconnect().catch(() => {});
  await send('done', { ok: !error, error, reason });
  await dispose();
  process.exit(error ? 1 : 0);
}

async function run(start) {
  if (start.protocol !== PROTOCOL) {
    // It would misread the job: no job, a failure that says why (docs/protocol.md).
    ending = 'refused';
    const version = JSON.stringify(start.protocol);
    const error = `the daemon speaks job protocol ${version}; this program speaks ${PROTOCOL}`;
    await send('done', { ok: false, error, reason: '' });
    process.exit(1);
  }
  send('running', { ts: Date.now() / 1000 });
  room = new Room();
  room.on(RoomEvent.DataReceived, (payload, participant, _kind, topic) => {
    if (!participant) return; // sent by a server SDK: nobody to answer
    const options = { reliable: true, destination_identities: [participant.identity], topic };
    room.localParticipant.publishData(payload, options).catch((e) => log('echo failed:', e));
  });
  room.on(RoomEvent.Disconnected, (why) => end(`room disconnected (${why})`));
  let failed = null;
  joining = room.connect(start.url, start.token).catch((e) => {
    failed = e;
  });
  await joining;
  if (failed !== null) {
    return end('cannot join the room', `cannot join the room: ${failed.message ?? failed}`);
  }
  if (ending !== null) return; // ended while it joined: end() leaves the room
  // Tells clients which job serves them, and makes LiveKit announce the participant at once.
  room.localParticipant.setAttributes({ 'lkrun.job_id': start.job.id }).catch(() => {});
  log(`echo ready in room ${start.job.room?.name} (dispatch metadata: ${start.job.metadata ?? ''})`);
}

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
lines.on('line', (line) => {
  let msg;
  try {
    msg = JSON.parse(line);
  } catch {
    return log('ignored a line that is not JSON');
  }
  if (msg === null || typeof msg !== 'object') return log('ignored a line that is not a message');
  if (msg.type === 'start' && room === null && ending === null) {
    run(msg).catch((e) => end('the job failed', `the job failed: ${e.message ?? e}`));
  } else if (msg.type === 'shutdown') end(msg.reason || 'shutdown');
  else if (msg.type === 'drain') log('the daemon is draining');
});
lines.on('close', () => end('daemon went away')); // stdin EOF: the daemon is gone

// Everything slow (loading the native library) is done: it may wait here for its job.
send('ready', { protocol: PROTOCOL, pid: process.pid, ts: Date.now() / 1000, warm: true });
