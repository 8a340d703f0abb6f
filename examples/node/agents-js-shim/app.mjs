// An agents-js app written as agents-js documents it, nothing of lkrun: a default export made
// by defineAgent and cli.runApp at the bottom. It echoes data packets back to their sender.
import { cli, defineAgent, ServerOptions } from '@livekit/agents';
import { RoomEvent } from '@livekit/rtc-node';
import { fileURLToPath } from 'node:url';

export default defineAgent({
  prewarm: async (proc) => {
    proc.userData.loadedAt = Date.now();
  },
  entry: async (ctx) => {
    await ctx.connect();
    ctx.room.on(RoomEvent.DataReceived, (payload, participant, _kind, topic) => {
      if (!participant) return;
      const options = { reliable: true, destination_identities: [participant.identity], topic };
      ctx.room.localParticipant.publishData(payload, options);
    });
    ctx.addShutdownCallback(async () => console.error('shutdown callback ran'));
    console.error(`agents-js app in ${ctx.room.name}, prewarmed at ${ctx.proc.userData.loadedAt}`);
  },
});

cli.runApp(new ServerOptions({ agent: fileURLToPath(import.meta.url) }));
