// A js-libp2p peer (TCP, Noise, Yamux) that speaks /gantry/coord/1.0.0 with its own
// protobuf encoding, written from docs/protocol.md: an implementation independent of the crate.
//
//   node peer.mjs client MULTIADDR DIGEST...   asks pull_intent for each digest and one
//                                              please_pull of all; prints the replies as JSON
//   node peer.mjs server                       answers fixed replies (unranked for the
//                                              digest sha256:ff…); prints its address
import './polyfill.mjs'
import { createLibp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { multiaddr } from '@multiformats/multiaddr'

const PROTOCOL = '/gantry/coord/1.0.0'
const MAX = 1 << 20

// --- protobuf, by hand -------------------------------------------------------------------
function varint (value) {
  let v = BigInt.asUintN(64, BigInt(value))
  const out = []
  do {
    let byte = Number(v & 0x7fn)
    v >>= 7n
    if (v !== 0n) byte |= 0x80
    out.push(byte)
  } while (v !== 0n)
  return out
}
const key = (field, type) => varint((field << 3) | type)
const bytesField = (field, bytes) => [...key(field, 2), ...varint(bytes.length), ...bytes]
const stringField = (field, s) => bytesField(field, [...new TextEncoder().encode(s)])
const intField = (field, n) => (BigInt(n) === 0n ? [] : [...key(field, 0), ...varint(n)])
const timestamp = (ms) => [...intField(1, Math.floor(ms / 1000)), ...intField(2, (ms % 1000) * 1e6)]

function parse (buf) {
  const fields = new Map()
  let i = 0
  const readVarint = () => {
    let result = 0n; let shift = 0n
    for (;;) {
      if (i >= buf.length) throw new Error('truncated varint')
      const b = buf[i++]
      result |= BigInt(b & 0x7f) << shift
      if ((b & 0x80) === 0) return result
      shift += 7n
    }
  }
  while (i < buf.length) {
    const k = readVarint()
    const field = Number(k >> 3n); const type = Number(k & 7n)
    let value
    if (type === 0) value = readVarint()
    else if (type === 2) { const len = Number(readVarint()); value = buf.subarray(i, i + len); i += len } else throw new Error(`wire type ${type}`)
    if (!fields.has(field)) fields.set(field, [])
    fields.get(field).push(value)
  }
  return fields
}
const one = (fields, n) => (fields.get(n) ?? []).at(-1)
const num = (fields, n) => one(fields, n) ?? 0n
const str = (fields, n) => new TextDecoder().decode(one(fields, n) ?? new Uint8Array())
const tsMs = (bytes) => {
  if (bytes === undefined) return null
  const f = parse(bytes)
  return Number(num(f, 1)) * 1000 + Math.floor(Number(num(f, 2)) / 1e6)
}

// --- framing: unsigned varint length, then the body --------------------------------------
const frame = (body) => Uint8Array.from([...varint(body.length), ...body])

async function readFrame (stream) {
  let buf = new Uint8Array()
  for await (const chunk of stream) {
    const data = chunk.subarray()
    const next = new Uint8Array(buf.length + data.length)
    next.set(buf); next.set(data, buf.length); buf = next
    let len = 0; let shift = 0; let i = 0
    for (; i < buf.length && i < 9; i++) {
      len += (buf[i] & 0x7f) * 2 ** shift; shift += 7
      if ((buf[i] & 0x80) === 0) break
    }
    if (i < buf.length && (buf[i] & 0x80) === 0) {
      if (len > MAX) throw new Error('frame over the cap')
      if (buf.length >= i + 1 + len) return buf.subarray(i + 1, i + 1 + len)
    }
  }
  if (buf.length === 0) return null
  throw new Error('stream ended inside a frame')
}

async function exchange (node, addr, envelope) {
  const stream = await node.dialProtocol(multiaddr(addr), PROTOCOL, { signal: AbortSignal.timeout(10_000) })
  stream.send(frame(envelope))
  await stream.close()
  const body = await readFrame(stream)
  if (body === null) return null
  return parse(body)
}

function pullIntentJson (f) {
  return {
    has_cached: num(f, 1) === 1n,
    in_flight: num(f, 2) === 1n,
    started_at_unix_ms: tsMs(one(f, 3)),
    hrw_rank: Number(BigInt.asIntN(32, num(f, 4))),
    recently_failed: num(f, 5) === 1n,
    cooldown_until_unix_ms: tsMs(one(f, 6)),
    failure_class: Number(num(f, 7))
  }
}

function resultJson (bytes) {
  const f = parse(bytes)
  return {
    digest: str(f, 1),
    outcome: Number(num(f, 2)),
    started_at_unix_ms: tsMs(one(f, 3)),
    cooldown_until_unix_ms: tsMs(one(f, 4)),
    failure_class: Number(num(f, 5))
  }
}

const node = await createLibp2p({
  addresses: { listen: process.argv[2] === 'server' ? ['/ip4/127.0.0.1/tcp/0'] : [] },
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()]
})

if (process.argv[2] === 'client') {
  const [addr, ...digests] = process.argv.slice(3)
  const out = { pull_intent: [], please_pull: null }
  for (const digest of digests) {
    const reply = await exchange(node, addr, bytesField(1, stringField(1, digest)))
    const body = one(reply, 2)
    out.pull_intent.push(body === undefined ? null : pullIntentJson(parse(body)))
  }
  const request = [
    ...digests.flatMap((d) => stringField(1, d)),
    ...stringField(2, 'docker.io'), ...stringField(3, 'library/nginx'),
    ...intField(4, 2), ...stringField(5, 'Bearer interop-secret')
  ]
  const reply = await exchange(node, addr, bytesField(3, request))
  const body = one(reply, 4)
  out.please_pull = body === undefined ? null : (parse(body).get(1) ?? []).map(resultJson)
  // A response body sent as a request: the node must close without a reply.
  out.wrong_body_reply = await exchange(node, addr, bytesField(2, intField(1, 1)))
  // A sha512 digest: the Go nodes accept sha256 only, so no reply either.
  out.sha512_reply = await exchange(node, addr, bytesField(1, stringField(1, 'sha512:' + 'ab'.repeat(64))))
  console.log(JSON.stringify(out))
  await node.stop()
  process.exit(0)
} else if (process.argv[2] === 'server') {
  const STARTED = 1700000000123
  const COOLDOWN = 4102444800456
  await node.handle(PROTOCOL, async (stream) => {
    const body = await readFrame(stream)
    const env = parse(body ?? new Uint8Array())
    let reply
    if (one(env, 1) !== undefined && str(parse(one(env, 1)), 1).endsWith('f'.repeat(64))) {
      // A node outside its own membership: unranked, written as -1 (a 10-byte varint).
      reply = bytesField(2, intField(4, -1))
    } else if (one(env, 1) !== undefined) {
      reply = bytesField(2, [
        ...intField(1, 1), ...intField(2, 1), ...bytesField(3, timestamp(STARTED)),
        ...intField(4, 3), ...intField(5, 1), ...bytesField(6, timestamp(COOLDOWN)), ...intField(7, 3)
      ])
    } else if (one(env, 3) !== undefined) {
      const req = parse(one(env, 3))
      const digests = (req.get(1) ?? []).map((b) => new TextDecoder().decode(b))
      const results = digests.flatMap((d, n) => {
        const outcome = [2, 1, 3, 0][n % 4]
        const fields = [...stringField(1, d), ...intField(2, outcome)]
        if (outcome === 1 || outcome === 2) fields.push(...bytesField(3, timestamp(STARTED)))
        if (outcome === 3) fields.push(...bytesField(4, timestamp(COOLDOWN)), ...intField(5, 2))
        return bytesField(1, fields)
      })
      reply = bytesField(4, results)
    }
    if (reply !== undefined) stream.send(frame(reply))
    await stream.close()
  })
  console.log(JSON.stringify({ addr: node.getMultiaddrs()[0].toString(), started_ms: STARTED, cooldown_ms: COOLDOWN }))
} else {
  console.error('usage: peer.mjs client MULTIADDR DIGEST... | peer.mjs server')
  process.exit(2)
}
