#!/usr/bin/env node
// Streams an answer from RouterService/Generate, built only from ../../protos.
//
//   AUTOGLM_API_KEY=ag_... node generate.js "Write a haiku about the sea" \
//       [--target 127.0.0.1:50051] [--ca-cert ../../.autoglm/certs/ca.pem] [--max-tokens 64]
//
// Without --ca-cert the channel is plaintext (a mesh started with `autoglm up --sidecar none`).
//
// Prints the text as it arrives, then one JSON line with usage, cost and finish reason.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

function parseArgs(argv) {
  const args = { target: '127.0.0.1:50051', maxTokens: 64, model: 'smollm2-135m-instruct', prompt: '', caCert: '' };
  for (let i = 0; i < argv.length; i += 1) {
    if (argv[i] === '--target') args.target = argv[++i];
    else if (argv[i] === '--max-tokens') args.maxTokens = Number(argv[++i]);
    else if (argv[i] === '--model') args.model = argv[++i];
    else if (argv[i] === '--ca-cert') args.caCert = argv[++i];
    else args.prompt = argv[i];
  }
  return args;
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const apiKey = process.env.AUTOGLM_API_KEY;
  if (!apiKey) {
    console.error('set AUTOGLM_API_KEY to an API key (autoglm keys create)');
    process.exit(2);
  }
  const protoRoot = path.resolve(__dirname, '..', '..', 'protos');
  const definition = protoLoader.loadSync('autoglm/router/v1/router_service.proto', {
    includeDirs: [protoRoot],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
  });
  const proto = grpc.loadPackageDefinition(definition);
  const credentials = args.caCert
    ? grpc.credentials.createSsl(fs.readFileSync(args.caCert))
    : grpc.credentials.createInsecure();
  const client = new proto.autoglm.router.v1.RouterService(args.target, credentials);
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${apiKey}`);

  const call = client.Generate(
    { model: args.model, prompt: args.prompt, sampling: { max_tokens: args.maxTokens, temperature: 0 } },
    metadata,
  );
  call.on('data', (message) => {
    if (message.delta) process.stdout.write(message.delta);
    if (message.summary) {
      const s = message.summary;
      process.stdout.write('\n');
      console.log(JSON.stringify({
        id: message.id,
        finish_reason: s.finish_reason,
        prompt_tokens: s.usage ? s.usage.prompt_tokens : 0,
        completion_tokens: s.usage ? s.usage.completion_tokens : 0,
        cost_micros: s.cost ? s.cost.micros : '0',
        currency: s.cost ? s.cost.currency_code : '',
        model_version: s.model_version,
        trace_id: s.trace_id,
      }));
    }
  });
  call.on('error', (err) => {
    console.error(`error: ${grpc.status[err.code]}: ${err.details}`);
    process.exit(1);
  });
  call.on('end', () => client.close());
}

main();
