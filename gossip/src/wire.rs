//! The wire format: one versioned envelope for every datagram and stream frame, serde + bincode 2
//! payloads, and foca's codec over the same serializer.
//!
//! ```text
//! envelope  = magic "WF" | version u8 | type u8 | payload
//! type 1    = SWIM: a foca packet (header and member updates encoded by [`FocaCodec`])
//! type 2    = gossip: a [`Packet`] (sender, its Lamport clock, one [`Body`])
//! stream    = length u32 big-endian | envelope          (one frame; at most `max_stream_frame`)
//! ```
//!
//! Decoding never panics and never allocates more than a small multiple of the input's length:
//! bincode's byte limit is set from the input size, and sequences preallocate at most a few
//! elements, growing only as real elements are decoded.

use std::fmt;

use bytes::{Buf, BufMut, Bytes};
use serde::{Deserialize, Deserializer, Serialize, de::DeserializeOwned};
use thiserror::Error;

use crate::identity::NodeId;

pub const MAGIC: [u8; 2] = *b"WF";
/// The wire version this build speaks.
pub const WIRE_VERSION: u8 = 2;
/// The oldest wire version this build still accepts (its own and the previous one, for rolling
/// upgrades). Version 2 added the instance to every node identity, which version 1 cannot
/// decode, so today that is only 2.
pub const MIN_WIRE_VERSION: u8 = 2;
/// Envelope bytes before the payload.
pub const ENVELOPE_LEN: usize = 4;
/// Length prefix of a stream frame.
pub const STREAM_PREFIX_LEN: usize = 4;

/// What an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    Swim = 1,
    Gossip = 2,
}

/// Why a frame was rejected. Every variant is counted by the node; none panics.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {0} bytes is shorter than the envelope")]
    Truncated(usize),
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 2]),
    #[error("wire version {0} is newer than this build's {WIRE_VERSION}: upgrade this node")]
    NewerVersion(u8),
    #[error("wire version {0} is older than the oldest supported ({MIN_WIRE_VERSION})")]
    OlderVersion(u8),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("undecodable payload: {0}")]
    Decode(String),
    #[error("{0} trailing bytes after the payload")]
    Trailing(usize),
    #[error("encode: {0}")]
    Encode(String),
}

/// Splits an envelope into its type and payload.
pub fn open_envelope(frame: &[u8]) -> Result<(FrameType, &[u8]), WireError> {
    if frame.len() < ENVELOPE_LEN {
        return Err(WireError::Truncated(frame.len()));
    }
    if frame[..2] != MAGIC {
        return Err(WireError::BadMagic([frame[0], frame[1]]));
    }
    let version = frame[2];
    if version > WIRE_VERSION {
        return Err(WireError::NewerVersion(version));
    }
    if version < MIN_WIRE_VERSION {
        return Err(WireError::OlderVersion(version));
    }
    let ty = match frame[3] {
        1 => FrameType::Swim,
        2 => FrameType::Gossip,
        other => return Err(WireError::UnknownType(other)),
    };
    Ok((ty, &frame[ENVELOPE_LEN..]))
}

pub(crate) fn envelope(ty: FrameType, capacity: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(ENVELOPE_LEN + capacity.min(64 << 10));
    v.extend_from_slice(&MAGIC);
    v.push(WIRE_VERSION);
    v.push(ty as u8);
    v
}

/// Prefixes a stream frame with its length, for the shell that writes it to TCP.
pub fn stream_prefix(frame_len: usize) -> [u8; STREAM_PREFIX_LEN] {
    (frame_len as u32).to_be_bytes()
}

/// Reads a stream frame's length prefix and checks it against `max`.
pub fn stream_frame_len(prefix: [u8; STREAM_PREFIX_LEN], max: usize) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    if len < ENVELOPE_LEN {
        return Err(WireError::Truncated(len));
    }
    Ok(len)
}

// ----- payload types -------------------------------------------------------------------------

/// Flags of a [`WireEntry`].
pub const FLAG_DELETED: u8 = 1;
pub const FLAG_CLUSTER: u8 = 2;
/// The sender holds the entry hidden because its owner failed; `reap_in_ms` is its residual.
pub const FLAG_HIDDEN: u8 = 4;
/// Lamport times at or above this are refused: a peer cannot push clocks to overflow.
pub const MAX_LTIME: u64 = 1 << 62;

/// One table entry version on the wire (events, sync transfers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEntry {
    pub table: String,
    pub key: String,
    pub owner: String,
    pub ltime: u64,
    pub flags: u8,
    /// Residual reap time of a tombstone or hidden entry, milliseconds.
    pub reap_in_ms: u32,
    pub value: Bytes,
}

impl WireEntry {
    /// This entry as a [`WireEntryRef`], borrowing its fields.
    pub fn borrowed(&self) -> WireEntryRef<'_> {
        WireEntryRef {
            table: &self.table,
            key: &self.key,
            owner: &self.owner,
            ltime: self.ltime,
            flags: self.flags,
            reap_in_ms: self.reap_in_ms,
            value: &self.value,
        }
    }
}

/// A [`WireEntry`] borrowed from the datagram it arrived in: decoding it allocates nothing, so
/// the duplicates gossip delivers (every event reaches a node many times) cost a lookup, not
/// four allocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct WireEntryRef<'a> {
    pub table: &'a str,
    pub key: &'a str,
    pub owner: &'a str,
    pub ltime: u64,
    pub flags: u8,
    pub reap_in_ms: u32,
    pub value: &'a [u8],
}

impl WireEntryRef<'_> {
    pub fn to_owned(&self) -> WireEntry {
        WireEntry {
            table: self.table.to_string(),
            key: self.key.to_string(),
            owner: self.owner.to_string(),
            ltime: self.ltime,
            flags: self.flags,
            reap_in_ms: self.reap_in_ms,
            value: Bytes::copy_from_slice(self.value),
        }
    }
}

/// What every gossip packet starts with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub from: NodeId,
    /// The sender's Lamport clock, witnessed by the receiver.
    pub ltime: u64,
}

/// One item of a sync summary: an entry's key hash and version fingerprint.
pub type SummaryItem = (u64, u64);

/// Gossip payloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// Table events of one network (datagram).
    Events {
        network: String,
        #[serde(deserialize_with = "cautious_vec")]
        events: Vec<WireEntry>,
    },
    /// Anti-entropy step 1 (stream): the requester's bucket digest of a network.
    SyncDigest {
        network: String,
        sync_id: u64,
        #[serde(deserialize_with = "cautious_vec")]
        buckets: Vec<u64>,
    },
    /// Step 2: for each bucket that differs, the responder's (key hash, fingerprint) pairs.
    SyncSummary {
        network: String,
        sync_id: u64,
        #[serde(deserialize_with = "cautious_vec")]
        buckets: Vec<u32>,
        #[serde(deserialize_with = "cautious_vec")]
        items: Vec<SummaryItem>,
        /// Large summaries are split by bucket over several frames; the last says so.
        last: bool,
    },
    /// Steps 3 and 4: entries the other side lacks or holds in another version, and the key
    /// hashes this side wants in return (empty in the last step).
    SyncEntries {
        network: String,
        sync_id: u64,
        #[serde(deserialize_with = "cautious_vec")]
        entries: Vec<WireEntry>,
        #[serde(deserialize_with = "cautious_vec")]
        want: Vec<u64>,
    },
    /// A point-to-point message for a protocol built on top.
    Message { data: Bytes },
    /// "Are you alive under this name?": sent to another life of the sender's own name.
    Probe { nonce: u64 },
    /// The answer to a [`Body::Probe`]; the head says who answered (instance, generation),
    /// `started` the generation it started with (a move above changes the head's, not this).
    ProbeAck { nonce: u64, started: u64 },
    /// "Another instance of your name lived at this generation, above yours": sent to a life
    /// of a name that membership refuses (an older life, by generation, of a reinstalled host
    /// whose clock stepped back), so it moves above.
    NewerLife { instance: u64, generation: u64 },
}

/// A gossip packet: sender and body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packet {
    pub head: Head,
    pub body: Body,
}

/// Preallocates at most a few elements whatever length the input claims; the vector then grows
/// only with elements actually decoded, so a lying length cannot allocate.
fn cautious_vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a sequence")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(16));
            while let Some(x) = seq.next_element()? {
                out.push(x);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V(std::marker::PhantomData))
}

// ----- bincode -------------------------------------------------------------------------------

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Serializes `value` with the wire's bincode configuration.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, WireError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| WireError::Encode(e.to_string()))
}

/// Appends the encoding of `value` to `out`.
pub fn encode_into<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), WireError> {
    bincode::serde::encode_into_std_write(value, out, config())
        .map(|_| ())
        .map_err(|e| WireError::Encode(e.to_string()))
}

macro_rules! decode_with_limit {
    ($bytes:expr, $($max_in:expr => $limit:expr),*) => {{
        let n = $bytes.len();
        $(
            if n <= $max_in {
                return bincode::serde::decode_from_slice($bytes, config().with_limit::<{ $limit }>())
                    .map_err(|e| WireError::Decode(e.to_string()));
            }
        )*
        Err(WireError::TooLarge { len: n, max: 64 << 20 })
    }};
}

/// Decodes one value from the front of `bytes`, returning it and the bytes consumed. The byte
/// limit grows with the input (16 times its size class), so claims beyond it are refused
/// before anything is allocated.
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), WireError> {
    decode_with_limit!(bytes,
        1 << 10 => 16 << 10,
        16 << 10 => 256 << 10,
        256 << 10 => 4 << 20,
        4 << 20 => 64 << 20,
        64 << 20 => 1 << 30)
}

/// Decodes exactly one value; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    let (v, used) = decode_prefix(bytes)?;
    if used != bytes.len() {
        return Err(WireError::Trailing(bytes.len() - used));
    }
    Ok(v)
}

/// A `Body::Events` packet decoded in place: its head, network and borrowed entries.
pub type EventsRef<'a> = (Head, &'a str, Vec<WireEntryRef<'a>>);

/// Decodes a gossip payload (envelope removed) if it is a `Body::Events` packet, borrowing the
/// entries from `payload`; `Ok(None)` for any other body, which [`decode`] then reads whole.
pub fn decode_events(payload: &[u8]) -> Result<Option<EventsRef<'_>>, WireError> {
    // In bincode a `Packet` is its head, then the body's variant index (Events is 0).
    const LIMIT: usize = 4 << 20;
    if payload.len() > LIMIT / 16 {
        return Err(WireError::TooLarge { len: payload.len(), max: LIMIT / 16 });
    }
    let cfg = config().with_limit::<LIMIT>();
    let dec = |e: bincode::error::DecodeError| WireError::Decode(e.to_string());
    let ((head, variant), used): ((Head, u32), usize) =
        bincode::serde::borrow_decode_from_slice(payload, cfg).map_err(dec)?;
    if variant != 0 {
        return Ok(None);
    }
    let rest = &payload[used..];
    let ((network, Cautious(events)), used): ((&str, Cautious<WireEntryRef<'_>>), usize) =
        bincode::serde::borrow_decode_from_slice(rest, cfg).map_err(dec)?;
    if used != rest.len() {
        return Err(WireError::Trailing(rest.len() - used));
    }
    Ok(Some((head, network, events)))
}

/// A sequence decoded with [`cautious_vec`].
struct Cautious<T>(Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Cautious<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        cautious_vec(d).map(Cautious)
    }
}

/// Decodes a whole gossip frame (envelope included).
pub fn decode_packet(frame: &[u8]) -> Result<Packet, WireError> {
    match open_envelope(frame)? {
        (FrameType::Gossip, payload) => decode(payload),
        (FrameType::Swim, _) => Err(WireError::UnknownType(FrameType::Swim as u8)),
    }
}

/// Encodes a gossip packet with its envelope.
pub fn encode_packet(packet: &Packet) -> Result<Vec<u8>, WireError> {
    let mut out = envelope(FrameType::Gossip, 256);
    encode_into(packet, &mut out)?;
    Ok(out)
}

/// Builds a `Body::Events` datagram out of entries already encoded one by one, without
/// re-encoding them: the result decodes as a [`Packet`].
#[derive(Debug)]
pub struct EventsPacketBuilder {
    buf: Vec<u8>,
    count: u64,
    limit: usize,
}

/// Bytes reserved for the varint event count (enough for 65,535 events).
const COUNT_RESERVE: usize = 3;

impl EventsPacketBuilder {
    pub fn new(head: &Head, network: &str, max_packet_size: usize) -> Result<Self, WireError> {
        let mut buf = envelope(FrameType::Gossip, max_packet_size);
        // `Packet { head, body: Body::Events { network, events } }` is, in bincode, the head,
        // the variant index, the network, the length and then each element.
        encode_into(&(head, 0u32, network), &mut buf)?;
        Ok(EventsPacketBuilder { buf, count: 0, limit: max_packet_size })
    }

    /// Room left for encoded entries.
    pub fn room(&self) -> usize {
        self.limit.saturating_sub(self.buf.len() + COUNT_RESERVE)
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends one encoded [`WireEntry`] if it fits; returns whether it did.
    pub fn push(&mut self, encoded: &[u8]) -> bool {
        if encoded.len() > self.room() {
            return false;
        }
        self.buf.extend_from_slice(encoded);
        self.count += 1;
        true
    }

    /// The datagram: the prefix, the count, the entries.
    pub fn finish(self, prefix_len: usize) -> Bytes {
        // `prefix_len` is where the entries start (the builder's length before any push).
        let mut out = Vec::with_capacity(self.buf.len() + COUNT_RESERVE);
        out.extend_from_slice(&self.buf[..prefix_len]);
        encode_into(&self.count, &mut out).expect("u64 encodes");
        out.extend_from_slice(&self.buf[prefix_len..]);
        Bytes::from(out)
    }

    /// Length of the prefix, to pass back to [`finish`](Self::finish).
    pub fn prefix_len(&self) -> usize {
        self.buf.len()
    }
}

// ----- foca codec ----------------------------------------------------------------------------

/// foca's codec over the wire's bincode configuration.
#[derive(Debug, Default, Clone, Copy)]
pub struct FocaCodec;

impl FocaCodec {
    fn put<T: Serialize>(value: &T, mut buf: impl BufMut) -> Result<(), WireError> {
        let bytes = encode(value)?;
        if buf.remaining_mut() < bytes.len() {
            return Err(WireError::Encode("buffer full".into()));
        }
        buf.put_slice(&bytes);
        Ok(())
    }

    fn get<T: DeserializeOwned>(mut buf: impl Buf) -> Result<T, WireError> {
        let (value, used) = decode_prefix(buf.chunk())?;
        buf.advance(used);
        Ok(value)
    }
}

impl foca::Codec<NodeId> for FocaCodec {
    type Error = WireError;

    fn encode_header(&mut self, h: &foca::Header<NodeId>, buf: impl BufMut) -> Result<(), WireError> {
        Self::put(h, buf)
    }

    fn decode_header(&mut self, buf: impl Buf) -> Result<foca::Header<NodeId>, WireError> {
        Self::get(buf)
    }

    fn encode_member(&mut self, m: &foca::Member<NodeId>, buf: impl BufMut) -> Result<(), WireError> {
        Self::put(m, buf)
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<foca::Member<NodeId>, WireError> {
        Self::get(buf)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // an arbitrary origin for virtual time
mod tests {
    use super::*;

    fn head() -> Head {
        Head { from: NodeId::new("n1", "127.0.0.1:7946".parse().unwrap(), 1), ltime: 42 }
    }

    fn entry(i: usize) -> WireEntry {
        WireEntry {
            table: "endpoints".into(),
            key: format!("key-{i}"),
            owner: "n1".into(),
            ltime: i as u64,
            flags: 0,
            reap_in_ms: 0,
            value: Bytes::from(vec![7u8; 20]),
        }
    }

    #[test]
    fn envelope_rejects_garbage_with_typed_errors() {
        assert_eq!(open_envelope(b"WF"), Err(WireError::Truncated(2)));
        assert_eq!(open_envelope(b"XX\x01\x02"), Err(WireError::BadMagic(*b"XX")));
        assert_eq!(open_envelope(b"WF\x09\x02"), Err(WireError::NewerVersion(9)));
        assert_eq!(open_envelope(b"WF\x01\x02"), Err(WireError::OlderVersion(1)));
        assert_eq!(open_envelope(b"WF\x02\x07"), Err(WireError::UnknownType(7)));
        assert_eq!(open_envelope(b"WF\x02\x02xyz").unwrap(), (FrameType::Gossip, &b"xyz"[..]));
    }

    #[test]
    fn built_events_packet_decodes_as_a_packet_and_respects_the_size() {
        let mut b = EventsPacketBuilder::new(&head(), "net1", 1400).unwrap();
        let prefix = b.prefix_len();
        let mut pushed = Vec::new();
        for i in 0..1000 {
            let e = entry(i);
            if !b.push(&encode(&e).unwrap()) {
                break;
            }
            pushed.push(e);
        }
        assert!(pushed.len() > 10, "a 1400-byte packet holds many small events");
        let bytes = b.finish(prefix);
        assert!(bytes.len() <= 1400, "packet is {} bytes", bytes.len());
        let p = decode_packet(&bytes).unwrap();
        assert_eq!(p.head, head());
        assert_eq!(p.body, Body::Events { network: "net1".into(), events: pushed.clone() });
        // The same packet decoded in place.
        let (h, network, events) = decode_events(&bytes[ENVELOPE_LEN..]).unwrap().unwrap();
        assert_eq!((h, network), (head(), "net1"));
        assert_eq!(events.iter().map(WireEntryRef::to_owned).collect::<Vec<_>>(), pushed);
        // Other bodies are left to the full decoder; truncation and trailing bytes are errors.
        let msg =
            encode_packet(&Packet { head: head(), body: Body::Message { data: Bytes::new() } }).unwrap();
        assert_eq!(decode_events(&msg[ENVELOPE_LEN..]), Ok(None));
        assert!(decode_events(&bytes[ENVELOPE_LEN..bytes.len() - 1]).is_err());
        let mut long = bytes.to_vec();
        long.push(0);
        assert_eq!(decode_events(&long[ENVELOPE_LEN..]), Err(WireError::Trailing(1)));
    }

    #[test]
    fn lying_lengths_are_refused_without_allocating() {
        // A packet whose event count claims 2^60 elements.
        let mut buf = envelope(FrameType::Gossip, 64);
        encode_into(&(head(), 0u32, "n"), &mut buf).unwrap();
        encode_into(&(1u64 << 60), &mut buf).unwrap();
        assert!(matches!(decode_packet(&buf), Err(WireError::Decode(_))));
        // A string claiming 4 GiB.
        let mut buf = envelope(FrameType::Gossip, 64);
        encode_into(&(u32::MAX as u64), &mut buf).unwrap();
        assert!(decode_packet(&buf).is_err());
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut bytes =
            encode_packet(&Packet { head: head(), body: Body::Message { data: Bytes::from_static(b"hi") } })
                .unwrap();
        bytes.push(0);
        assert_eq!(decode_packet(&bytes), Err(WireError::Trailing(1)));
    }

    #[test]
    fn stream_lengths_are_bounded() {
        assert_eq!(stream_frame_len(stream_prefix(100), 1000), Ok(100));
        assert_eq!(
            stream_frame_len(stream_prefix(2000), 1000),
            Err(WireError::TooLarge { len: 2000, max: 1000 })
        );
        assert_eq!(stream_frame_len(stream_prefix(1), 1000), Err(WireError::Truncated(1)));
    }

    #[test]
    fn foca_codec_round_trips_headers() {
        use foca::Codec;
        let id = head().from;
        let h = foca::Header {
            src: id.clone(),
            src_incarnation: 3,
            dst: id.clone(),
            message: foca::Message::Ping(9),
        };
        let mut buf = Vec::new();
        FocaCodec.encode_header(&h, &mut buf).unwrap();
        let m = foca::Member::alive(id);
        FocaCodec.encode_member(&m, &mut buf).unwrap();
        let mut slice = &buf[..];
        assert_eq!(FocaCodec.decode_header(&mut slice).unwrap(), h);
        assert_eq!(FocaCodec.decode_member(&mut slice).unwrap(), m);
        assert!(slice.is_empty());
    }
}
