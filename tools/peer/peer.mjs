// The bench's peer: BullMQ on the bench's Redis, in the shapes of two of our workloads, so that
// `ge-orchestrator bench --workloads route,chains,peer` prints our figure over the peer's from
// one sitting (src/tools/bench/peer.rs runs this and reads its last line).
//
//   node peer.mjs route  --redis URL --n N --workers W --concurrency C --timeout-s T
//   node peer.mjs chains --redis URL --n N --workers W --concurrency C --timeout-s T
//
// route:  W worker processes start and wait; then N no-op jobs are added with addBulk in slices
//         of 500 (our producer's pipelines); timed from the first add to the last job started
//         (our route: from the first send to the last trigger seen).
// chains: N flows of 10 (FlowProducer: each job the only child of the next) are added before
//         any worker runs; then the W workers start; timed from the start to the last
//         completion (our chains: the whole backlog written before the replicas start).
//
// Prints one JSON line: jobs, processed, unique, seconds, jobs_per_s and latency samples in
// microseconds (route: from the add to the job's start; chains: from the end of a job to the
// start of the job it unblocked, our completion->dispatch).

import { fork } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { FlowProducer, Queue, Worker } from 'bullmq';

const QUEUE = 'ge-bench-peer';
const SLICE = 500;

/// Wall-clock microseconds, comparable across the processes of this machine (as the bench's).
const nowUs = () => Math.round((performance.timeOrigin + performance.now()) * 1000);

function flags(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--')) throw new Error(`unexpected argument ${argv[i]}`);
    out[argv[i].slice(2)] = argv[i + 1];
  }
  return out;
}

function connection(url) {
  const u = new URL(url);
  return {
    host: u.hostname,
    port: Number(u.port || 6379),
    username: u.username || undefined,
    password: u.password ? decodeURIComponent(u.password) : undefined,
    db: Number(u.pathname.slice(1) || 0),
    // Workers need it (their blocking reads must not time out); harmless for the others.
    maxRetriesPerRequest: null,
  };
}

/// A worker process: a no-op processor that notes when each job started; reports its count
/// every 100 ms, and every start when told to stop.
async function work(opts) {
  const started = [];
  let lastCompleted = 0;
  const worker = new Worker(
    QUEUE,
    async (job) => {
      started.push([job.id, nowUs()]);
    },
    { connection: connection(opts.redis), concurrency: Number(opts.concurrency), autorun: false },
  );
  worker.on('completed', () => {
    lastCompleted = nowUs();
  });
  worker.on('error', (e) => process.send({ type: 'error', message: String(e) }));
  // The driver is gone (killed with the bench): nothing will ask for the report.
  process.on('disconnect', () => process.exit(1));
  await worker.waitUntilReady();
  const tick = setInterval(() => process.send({ type: 'count', n: started.length }), 100);
  process.on('message', async (m) => {
    if (m === 'go') {
      worker.run().catch((e) => process.send({ type: 'error', message: String(e) }));
    } else if (m === 'stop') {
      clearInterval(tick);
      await worker.close();
      process.send({ type: 'done', started, lastCompleted }, () => process.exit(0));
    }
  });
  process.send({ type: 'ready' });
}

function startWorkers(opts) {
  const script = fileURLToPath(import.meta.url);
  const args = ['work', '--redis', opts.redis, '--concurrency', opts.concurrency];
  return Array.from({ length: Number(opts.workers) }, () => {
    const child = fork(script, args, { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    const w = { child, count: 0, ready: null, done: null };
    // A send to a worker that died fails here; its exit is handled below.
    child.on('error', (e) => process.stderr.write(`peer worker: ${e}\n`));
    w.ready = new Promise((resolve, reject) => {
      child.on('exit', (code) => reject(new Error(`a worker process exited with ${code}`)));
      child.on('message', (m) => {
        if (m.type === 'ready') resolve();
        else if (m.type === 'count') w.count = m.n;
        else if (m.type === 'error') process.stderr.write(`peer worker: ${m.message}\n`);
      });
    });
    // A worker that died reports nothing: its jobs count as not started.
    w.done = new Promise((resolve) => {
      child.on('message', (m) => m.type === 'done' && resolve(m));
      child.on('exit', () => resolve({ started: [], lastCompleted: 0 }));
    });
    return w;
  });
}

/// The N flows of 10 as FlowProducer trees: step 9 is the root, each step's only child the one
/// before it, so step 0 runs first and each completion releases the next.
function chain(c) {
  let node;
  for (let i = 0; i < 10; i++) {
    node = { name: 'noop', queueName: QUEUE, opts: { jobId: `c${c}.${i}` }, ...(node ? { children: [node] } : {}) };
  }
  return node;
}

async function drive(shape, opts) {
  const n = Number(opts.n);
  const jobs = shape === 'chains' ? n * 10 : n;
  const deadline = Date.now() + Number(opts['timeout-s']) * 1000;
  const conn = connection(opts.redis);
  if (shape === 'chains') {
    const flows = new FlowProducer({ connection: conn });
    for (let c = 0; c < n; c += SLICE / 10) {
      await flows.addBulk(Array.from({ length: Math.min(SLICE / 10, n - c) }, (_, i) => chain(c + i)));
    }
    await flows.close();
  }
  const workers = startWorkers(opts);
  await Promise.all(workers.map((w) => w.ready));
  const go = nowUs();
  for (const w of workers) w.child.send('go');
  let first = go;
  const added = new Map();
  if (shape === 'route') {
    const queue = new Queue(QUEUE, { connection: conn });
    first = nowUs();
    for (let i = 0; i < n; i += SLICE) {
      const slice = Array.from({ length: Math.min(SLICE, n - i) }, (_, k) => ({ name: 'noop', data: {}, opts: { jobId: `r${i + k}` } }));
      const at = nowUs();
      await queue.addBulk(slice);
      for (const j of slice) added.set(j.opts.jobId, at);
    }
    await queue.close();
  }
  while (workers.reduce((s, w) => s + w.count, 0) < jobs && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 20));
  }
  for (const w of workers) if (w.child.connected) w.child.send('stop');
  const reports = await Promise.all(workers.map((w) => w.done));
  const started = new Map();
  let processed = 0;
  let last = first;
  for (const r of reports) {
    processed += r.started.length;
    for (const [id, at] of r.started) if (!started.has(id)) started.set(id, at);
    if (shape === 'chains') last = Math.max(last, r.lastCompleted);
    else for (const [, at] of r.started) last = Math.max(last, at);
  }
  const latencyUs = [];
  if (shape === 'route') {
    for (const [id, at] of started) if (added.has(id)) latencyUs.push(Math.max(0, at - added.get(id)));
  } else {
    // A no-op ends when it starts: the end of step i-1 is its start.
    for (const [id, at] of started) {
      const [c, i] = id.slice(1).split('.');
      const before = started.get(`c${c}.${Number(i) - 1}`);
      if (Number(i) > 0 && before !== undefined) latencyUs.push(Math.max(0, at - before));
    }
  }
  const seconds = Math.max(last - first, 1) / 1e6;
  const out = { shape, jobs, processed, unique: started.size, seconds, jobs_per_s: started.size / seconds, latency_us: latencyUs };
  // Exit only once the answer is written: on a pipe, process.exit() cut it at 64 KiB.
  await new Promise((resolve) => process.stdout.write(`${JSON.stringify(out)}\n`, resolve));
}

const [cmd, ...rest] = process.argv.slice(2);
const opts = flags(rest);
if (cmd === 'work') {
  await work(opts);
} else if (cmd === 'route' || cmd === 'chains') {
  await drive(cmd, opts);
  process.exit(0);
} else {
  process.stderr.write('usage: node peer.mjs route|chains --redis URL --n N --workers W --concurrency C --timeout-s T\n');
  process.exit(2);
}
