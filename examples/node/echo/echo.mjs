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

const send = (type, fields = {}) => protocol(JSON.stringify({ type, ...fields }) + '\n');
const log = (...args) => console.error(...args);

let room = null;
let ending = null; // the first reason the job ends for

async function end(reason, error = '') {
  if (ending !== null) return;
  ending = reason;
  if (room === null) process.exit(0); // stopped before a job came: nothing to report
  await room.disconnect().catch(() => {});
  send('done', { ok: !error, error, reason });
  await dispose();
  process.exit(error ? 1 : 0);
}

async function run(start) {
  send('running', { ts: Date.now() / 1000 });
  room = new Room();
  room.on(RoomEvent.DataReceived, (payload, participant, _kind, topic) => {
    if (!participant) return; // sent by a server SDK: nobody to answer
    const options = { reliable: true, destination_identities: [participant.identity], topic };
    room.localParticipant.publishData(payload, options).catch((e) => log('echo failed:', e));
  });
  room.on(RoomEvent.Disconnected, (why) => end(`room disconnected (${why})`));
  try {
    await room.connect(start.url, start.token);
  } catch (e) {
    return end('cannot join the room', `cannot join the room: ${e.message ?? e}`);
  }
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
  if (msg.type === 'start' && room === null && ending === null) run(msg);
  else if (msg.type === 'shutdown') end(msg.reason || 'shutdown');
  else if (msg.type === 'drain') log('the daemon is draining');
});
lines.on('close', () => end('daemon went away')); // stdin EOF: the daemon is gone

// Everything slow (loading the native library) is done: it may wait here for its job.
send('ready', { protocol: 1, pid: process.pid, ts: Date.now() / 1000, warm: true });
