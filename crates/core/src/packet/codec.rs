//! The packet wire format: how the changes one replica exports for another are laid
//! out in bytes, signed with the family's shared secret, and checked on the way in.
//!
//! The layout, byte by byte, and the order of the checks are in
//! `docs/packet-format.md`. In short: a header (format, packet version, family,
//! sender, target, incarnations), the per-origin sequence ranges, a zstd-compressed
//! JSON body of [`Change`]s, an HMAC-SHA256 and a truncated SHA-256 checksum.
//!
//! Decoding trusts nothing: every length is checked against what is left, the
//! checksum and the MAC are verified before anything is parsed past the fixed
//! prefix, and the body is decompressed into a buffer no larger than the length the
//! signed header declares (and never larger than [`Limits::max_body_bytes`]).

use crate::packet::change::Change;
use ring::{digest, hmac};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The first four bytes of every packet.
pub const MAGIC: [u8; 4] = *b"MSPK";

/// The container format this code writes and reads. It changes only when the byte
/// layout changes; the packet version (Table 2) travels inside it.
pub const FORMAT_VERSION: u16 = 1;

/// Longest family, replica or origin name in bytes: a Kubernetes object name.
pub const MAX_NAME_BYTES: usize = 253;

/// Shortest family secret accepted: 128 bits.
pub const MIN_SECRET_BYTES: usize = 16;

const MAC_BYTES: usize = 32;
const CHECKSUM_BYTES: usize = 8;
const TRAILER_BYTES: usize = MAC_BYTES + CHECKSUM_BYTES;

/// The smallest well-formed packet: the fixed fields, three one-byte names, no
/// ranges, an empty body and the trailer. Anything shorter is refused before hashing.
pub const MIN_PACKET_BYTES: usize =
    MAGIC.len() + 2 + 2 + 3 * (2 + 1) + 8 + 8 + 2 + 4 + 4 + TRAILER_BYTES;

/// zstd's default level: JSON of changes compresses well already at this level,
/// and export stays cheap.
const COMPRESSION_LEVEL: i32 = 3;

/// Who a packet is from and for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketHeader {
    /// The Table 2 version the sender creates. The receiver judges acceptance.
    pub packet_version: u16,
    /// The family both replicas belong to.
    pub family: String,
    /// The replica that exported the packet.
    pub sender: String,
    /// The sender's incarnation: it changes when the sender is restored from backup.
    pub sender_incarnation: u64,
    /// The replica the packet is meant for.
    pub target: String,
    /// The target's incarnation as the sender believes it; a target restored since
    /// then has a newer one and refuses the packet.
    pub target_incarnation: u64,
}

/// The sequence numbers of one origin's changes carried by a packet, both ends
/// included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginRange {
    pub origin: String,
    pub first: u64,
    pub last: u64,
}

/// A decoded packet, checked: signed with the family's secret, its ranges matching
/// its changes exactly.
#[derive(Clone, Debug, PartialEq)]
pub struct Packet {
    pub header: PacketHeader,
    /// One per origin present in the body, ordered by origin name.
    pub ranges: Vec<OriginRange>,
    /// In the sender's log order.
    pub changes: Vec<Change>,
    /// Each change's JSON text as it arrived, so the receiver can log it without
    /// writing it out again.
    pub texts: Vec<String>,
}

/// The family's shared secret, keying the MAC of every packet.
pub struct FamilySecret {
    key: hmac::Key,
}

impl FamilySecret {
    /// Takes the secret's bytes; a secret shorter than [`MIN_SECRET_BYTES`] is refused
    /// because a short key makes forging a packet feasible.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, PacketError> {
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(PacketError::SecretTooShort {
                len: bytes.len(),
                min: MIN_SECRET_BYTES,
            });
        }
        Ok(FamilySecret {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        })
    }
}

impl fmt::Debug for FamilySecret {
    // Written by hand so that logs and error reports never carry the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FamilySecret(<redacted>)")
    }
}

/// Bounds a receiver puts on what it decodes, so that one packet cannot exhaust its
/// memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest packet accepted, in bytes as received.
    pub max_packet_bytes: usize,
    /// Largest decompressed body accepted, in bytes.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packet_bytes: 256 * 1024 * 1024,
            max_body_bytes: 1024 * 1024 * 1024,
        }
    }
}

/// A part of the packet, as named in error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketField {
    Magic,
    FormatVersion,
    PacketVersion,
    Family,
    Sender,
    Target,
    SenderIncarnation,
    TargetIncarnation,
    RangeCount,
    /// The origin name of the range at this position (counting from 0).
    RangeOrigin(usize),
    RangeFirst(usize),
    RangeLast(usize),
    DecodedLength,
    BodyLength,
    Body,
}

impl fmt::Display for PacketField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PacketField::Magic => f.write_str("magic"),
            PacketField::FormatVersion => f.write_str("container format version"),
            PacketField::PacketVersion => f.write_str("packet version"),
            PacketField::Family => f.write_str("family name"),
            PacketField::Sender => f.write_str("sender name"),
            PacketField::Target => f.write_str("target name"),
            PacketField::SenderIncarnation => f.write_str("sender incarnation"),
            PacketField::TargetIncarnation => f.write_str("target incarnation"),
            PacketField::RangeCount => f.write_str("range count"),
            PacketField::RangeOrigin(i) => write!(f, "origin name of range {i}"),
            PacketField::RangeFirst(i) => write!(f, "first sequence number of range {i}"),
            PacketField::RangeLast(i) => write!(f, "last sequence number of range {i}"),
            PacketField::DecodedLength => f.write_str("decoded body length"),
            PacketField::BodyLength => f.write_str("body length"),
            PacketField::Body => f.write_str("body"),
        }
    }
}

/// Why a packet could not be encoded or was refused. Offsets count bytes from the
/// start of the packet; change positions count from 0 in the body's order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("the family secret is {len} bytes long; at least {min} are required")]
    SecretTooShort { len: usize, min: usize },

    #[error("not a packet: {len} bytes, the smallest packet is {min} bytes")]
    TooShort { len: usize, min: usize },

    #[error("not a packet: it starts with \"{found}\" instead of \"MSPK\"")]
    BadMagic { found: String },

    #[error(
        "packet container format {version} is not supported; this build reads format {FORMAT_VERSION}"
    )]
    UnsupportedFormat { version: u16 },

    #[error("the packet is {len} bytes, more than the limit of {max} bytes")]
    Oversize { len: usize, max: usize },

    #[error(
        "the packet is corrupted: its checksum does not match its {len} bytes (damaged, cut short or extended on the way)"
    )]
    Corrupted { len: usize },

    #[error(
        "the packet is not signed with this family's secret (another family, a rotated secret, or a forgery)"
    )]
    NotSigned,

    #[error(
        "the packet is truncated in the {field} at offset {offset}: {needed} bytes needed, {available} left"
    )]
    Truncated {
        field: PacketField,
        offset: usize,
        needed: usize,
        available: usize,
    },

    #[error("{count} unexpected bytes after the body, at offset {offset}")]
    TrailingBytes { offset: usize, count: usize },

    #[error("the {field} is not valid UTF-8 (bad byte at offset {offset})")]
    NameNotUtf8 { field: PacketField, offset: usize },

    #[error("the {field} at offset {offset} is empty")]
    NameEmpty { field: PacketField, offset: usize },

    #[error(
        "the {field} at offset {offset} is {len} bytes long; at most {MAX_NAME_BYTES} are allowed"
    )]
    NameTooLong {
        field: PacketField,
        offset: usize,
        len: usize,
    },

    #[error(
        "the range of origin {origin:?} is {first}..={last}: sequence numbers start at 1 and the first must not exceed the last"
    )]
    InvalidRange {
        origin: String,
        first: u64,
        last: u64,
    },

    #[error("origin {origin:?} has a second range at offset {offset}")]
    DuplicateOrigin { origin: String, offset: usize },

    #[error("the changes come from {count} origins; a packet carries at most 65535")]
    TooManyOrigins { count: usize },

    #[error("the body is {len} bytes; a packet body holds at most 4294967295")]
    BodyTooLarge { len: usize },

    #[error("the body declares {declared} bytes decompressed, more than the limit of {cap} bytes")]
    BodyOverCap { declared: usize, cap: usize },

    #[error("the body does not decompress to its declared {declared} bytes: {reason}")]
    Decompression { declared: usize, reason: String },

    #[error("the body is not a JSON array of changes: {reason}")]
    BadBody { reason: String },

    #[error("the body could not be encoded: {reason}")]
    Encoding { reason: String },

    #[error("the change at position {index} comes from origin {origin:?}, which has no range")]
    OriginNotInRanges { index: usize, origin: String },

    #[error(
        "the change at position {index} (origin {origin:?}, seq {seq}) is outside its origin's range {first}..={last}"
    )]
    ChangeOutsideRange {
        index: usize,
        origin: String,
        seq: u64,
        first: u64,
        last: u64,
    },

    #[error(
        "the change at position {index} (origin {origin:?}) has seq {seq}, not above the previous {previous}"
    )]
    SeqNotIncreasing {
        index: usize,
        origin: String,
        seq: u64,
        previous: u64,
    },

    #[error(
        "the change at position {index} (origin {origin:?}) has seq {seq} where {expected} is expected: a gap"
    )]
    SeqGap {
        index: usize,
        origin: String,
        seq: u64,
        expected: u64,
    },

    #[error("origin {origin:?} has a range but no changes in the body")]
    RangeWithoutChanges { origin: String },

    #[error(
        "the range of origin {origin:?} is {first}..={last} but the body has {count} of its changes"
    )]
    RangeCountMismatch {
        origin: String,
        first: u64,
        last: u64,
        count: u64,
    },
}

/// Lays out and signs a packet of `changes` for `header.target`.
///
/// The ranges are computed from the changes: each origin's sequence numbers must
/// start at 1 or above and increase by exactly one within the packet, because the
/// receiver applies one origin's changes in order and holds back anything with a gap.
pub fn encode(
    header: &PacketHeader,
    changes: &[Change],
    secret: &FamilySecret,
) -> Result<Vec<u8>, PacketError> {
    let ranges = ranges_of(changes)?;
    let range_count = u16::try_from(ranges.len()).map_err(|_| PacketError::TooManyOrigins {
        count: ranges.len(),
    })?;

    let json = serde_json::to_vec(changes).map_err(|e| PacketError::Encoding {
        reason: e.to_string(),
    })?;
    let decoded_len = body_field_len(json.len())?;
    let body =
        zstd::bulk::compress(&json, COMPRESSION_LEVEL).map_err(|e| PacketError::Encoding {
            reason: e.to_string(),
        })?;
    let body_len = body_field_len(body.len())?;

    let mut out = Vec::with_capacity(MIN_PACKET_BYTES + body.len() + 64 * ranges.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    out.extend_from_slice(&header.packet_version.to_be_bytes());
    put_name(&mut out, PacketField::Family, &header.family)?;
    put_name(&mut out, PacketField::Sender, &header.sender)?;
    put_name(&mut out, PacketField::Target, &header.target)?;
    out.extend_from_slice(&header.sender_incarnation.to_be_bytes());
    out.extend_from_slice(&header.target_incarnation.to_be_bytes());
    out.extend_from_slice(&range_count.to_be_bytes());
    for (i, range) in ranges.iter().enumerate() {
        check_range(range)?;
        put_name(&mut out, PacketField::RangeOrigin(i), &range.origin)?;
        out.extend_from_slice(&range.first.to_be_bytes());
        out.extend_from_slice(&range.last.to_be_bytes());
    }
    out.extend_from_slice(&decoded_len.to_be_bytes());
    out.extend_from_slice(&body_len.to_be_bytes());
    out.extend_from_slice(&body);

    // The MAC comes first and the checksum covers it, so that damage anywhere,
    // MAC included, reads as corruption and only an intact packet can read as forged.
    let tag = hmac::sign(&secret.key, &out);
    out.extend_from_slice(tag.as_ref());
    let sum = checksum(&out);
    out.extend_from_slice(&sum);
    Ok(out)
}

/// Checks and decodes a packet: checksum, then MAC, then the header, then the body
/// (decompressed within `limits`), then the ranges against the changes.
pub fn decode(bytes: &[u8], secret: &FamilySecret, limits: &Limits) -> Result<Packet, PacketError> {
    let (content, mac) = checked_content(bytes, Some(limits.max_packet_bytes))?;
    hmac::verify(&secret.key, content, mac).map_err(|_| PacketError::NotSigned)?;
    let frame = parse_frame(content)?;

    if frame.decoded_len > limits.max_body_bytes {
        return Err(PacketError::BodyOverCap {
            declared: frame.decoded_len,
            cap: limits.max_body_bytes,
        });
    }
    // The capacity is the signed, capped declared length: a body that would expand
    // further fails here instead of allocating more.
    let json = zstd::bulk::decompress(frame.body, frame.decoded_len).map_err(|e| {
        PacketError::Decompression {
            declared: frame.decoded_len,
            reason: e.to_string(),
        }
    })?;
    if json.len() != frame.decoded_len {
        return Err(PacketError::Decompression {
            declared: frame.decoded_len,
            reason: format!("it decompresses to {} bytes", json.len()),
        });
    }
    let raw: Vec<&serde_json::value::RawValue> =
        serde_json::from_slice(&json).map_err(|e| PacketError::BadBody {
            reason: e.to_string(),
        })?;
    let mut changes = Vec::with_capacity(raw.len());
    let mut texts = Vec::with_capacity(raw.len());
    for (i, text) in raw.iter().enumerate() {
        let change: Change =
            serde_json::from_str(text.get()).map_err(|e| PacketError::BadBody {
                reason: format!("change {i}: {e}"),
            })?;
        changes.push(change);
        texts.push(text.get().to_string());
    }
    check_changes(&frame.ranges, &changes)?;

    Ok(Packet {
        header: frame.header,
        ranges: frame.ranges,
        changes,
        texts,
    })
}

/// Reads the header and ranges of a packet without the family secret, for listing
/// held packets.
///
/// Only the checksum is verified, which anyone can compute: the result is
/// **unauthenticated** and must not drive any decision; [`decode`] does that.
pub fn peek_header(bytes: &[u8]) -> Result<(PacketHeader, Vec<OriginRange>), PacketError> {
    let (content, _mac) = checked_content(bytes, None)?;
    let frame = parse_frame(content)?;
    Ok((frame.header, frame.ranges))
}

/// The signed part of a packet and its MAC, after the checks that need no parsing:
/// magic, container format, size, checksum.
fn checked_content(bytes: &[u8], max_len: Option<usize>) -> Result<(&[u8], &[u8]), PacketError> {
    // The magic is judged first, even on a short input, so that a file that is not a
    // packet at all is named as such.
    let shown = bytes.len().min(MAGIC.len());
    let head = bytes.get(..shown).unwrap_or_default();
    if MAGIC.get(..shown) != Some(head) {
        return Err(PacketError::BadMagic {
            found: head.escape_ascii().to_string(),
        });
    }
    let too_short = PacketError::TooShort {
        len: bytes.len(),
        min: MIN_PACKET_BYTES,
    };
    let version = bytes
        .get(MAGIC.len()..)
        .and_then(|rest| rest.first_chunk::<2>())
        .ok_or_else(|| too_short.clone())?;
    let version = u16::from_be_bytes(*version);
    if version != FORMAT_VERSION {
        return Err(PacketError::UnsupportedFormat { version });
    }
    if bytes.len() < MIN_PACKET_BYTES {
        return Err(too_short);
    }
    if let Some(max) = max_len
        && bytes.len() > max
    {
        return Err(PacketError::Oversize {
            len: bytes.len(),
            max,
        });
    }

    let corrupted = PacketError::Corrupted { len: bytes.len() };
    let (signed, sum) = bytes
        .split_last_chunk::<CHECKSUM_BYTES>()
        .ok_or_else(|| corrupted.clone())?;
    if checksum(signed) != *sum {
        return Err(corrupted);
    }
    let (content, mac) = signed.split_last_chunk::<MAC_BYTES>().ok_or(corrupted)?;
    Ok((content, mac.as_slice()))
}

fn checksum(data: &[u8]) -> [u8; CHECKSUM_BYTES] {
    let digest = digest::digest(&digest::SHA256, data);
    let mut sum = [0u8; CHECKSUM_BYTES];
    for (out, byte) in sum.iter_mut().zip(digest.as_ref()) {
        *out = *byte;
    }
    sum
}

/// The parsed signed part of a packet; the body still compressed.
struct Frame<'a> {
    header: PacketHeader,
    ranges: Vec<OriginRange>,
    decoded_len: usize,
    body: &'a [u8],
}

fn parse_frame(content: &[u8]) -> Result<Frame<'_>, PacketError> {
    let mut reader = Reader {
        bytes: content,
        pos: 0,
    };
    reader.fixed::<4>(PacketField::Magic)?;
    reader.u16(PacketField::FormatVersion)?;
    let packet_version = reader.u16(PacketField::PacketVersion)?;
    let family = reader.name(PacketField::Family)?;
    let sender = reader.name(PacketField::Sender)?;
    let target = reader.name(PacketField::Target)?;
    let sender_incarnation = reader.u64(PacketField::SenderIncarnation)?;
    let target_incarnation = reader.u64(PacketField::TargetIncarnation)?;

    let count = usize::from(reader.u16(PacketField::RangeCount)?);
    let mut ranges: Vec<OriginRange> = Vec::with_capacity(count);
    let mut seen = BTreeSet::new();
    for i in 0..count {
        let offset = reader.pos;
        let range = OriginRange {
            origin: reader.name(PacketField::RangeOrigin(i))?,
            first: reader.u64(PacketField::RangeFirst(i))?,
            last: reader.u64(PacketField::RangeLast(i))?,
        };
        check_range(&range)?;
        if !seen.insert(range.origin.clone()) {
            return Err(PacketError::DuplicateOrigin {
                origin: range.origin,
                offset,
            });
        }
        ranges.push(range);
    }

    let decoded_len = reader.len32(PacketField::DecodedLength)?;
    let body_len = reader.len32(PacketField::BodyLength)?;
    let body = reader.take(body_len, PacketField::Body)?;
    let rest = reader.rest();
    if !rest.is_empty() {
        return Err(PacketError::TrailingBytes {
            offset: reader.pos,
            count: rest.len(),
        });
    }

    Ok(Frame {
        header: PacketHeader {
            packet_version,
            family,
            sender,
            sender_incarnation,
            target,
            target_incarnation,
        },
        ranges,
        decoded_len,
        body,
    })
}

/// Reads fields front to back, refusing to read past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn rest(&self) -> &'a [u8] {
        self.bytes.get(self.pos..).unwrap_or_default()
    }

    fn truncated(&self, field: PacketField, needed: usize) -> PacketError {
        PacketError::Truncated {
            field,
            offset: self.pos,
            needed,
            available: self.rest().len(),
        }
    }

    fn take(&mut self, n: usize, field: PacketField) -> Result<&'a [u8], PacketError> {
        let taken = self
            .rest()
            .get(..n)
            .ok_or_else(|| self.truncated(field, n))?;
        self.pos += n;
        Ok(taken)
    }

    fn fixed<const N: usize>(&mut self, field: PacketField) -> Result<[u8; N], PacketError> {
        let chunk = *self
            .rest()
            .first_chunk::<N>()
            .ok_or_else(|| self.truncated(field, N))?;
        self.pos += N;
        Ok(chunk)
    }

    fn u16(&mut self, field: PacketField) -> Result<u16, PacketError> {
        self.fixed(field).map(u16::from_be_bytes)
    }

    fn u64(&mut self, field: PacketField) -> Result<u64, PacketError> {
        self.fixed(field).map(u64::from_be_bytes)
    }

    /// A u32 length, as a usize (lossless on every platform we build for; if not,
    /// the length cannot be satisfied anyway and reads as truncation).
    fn len32(&mut self, field: PacketField) -> Result<usize, PacketError> {
        let len = self.fixed(field).map(u32::from_be_bytes)?;
        Ok(usize::try_from(len).unwrap_or(usize::MAX))
    }

    fn name(&mut self, field: PacketField) -> Result<String, PacketError> {
        let offset = self.pos;
        let len = usize::from(self.u16(field)?);
        let raw = self.take(len, field)?;
        check_name(raw, field, offset).map(str::to_owned)
    }
}

/// The rules every name on the wire follows, on both sides. `offset` is where the
/// name's length prefix starts.
fn check_name(raw: &[u8], field: PacketField, offset: usize) -> Result<&str, PacketError> {
    if raw.is_empty() {
        return Err(PacketError::NameEmpty { field, offset });
    }
    if raw.len() > MAX_NAME_BYTES {
        return Err(PacketError::NameTooLong {
            field,
            offset,
            len: raw.len(),
        });
    }
    std::str::from_utf8(raw).map_err(|e| PacketError::NameNotUtf8 {
        field,
        offset: offset + 2 + e.valid_up_to(),
    })
}

fn put_name(out: &mut Vec<u8>, field: PacketField, name: &str) -> Result<(), PacketError> {
    let offset = out.len();
    check_name(name.as_bytes(), field, offset)?;
    let len = u16::try_from(name.len()).map_err(|_| PacketError::NameTooLong {
        field,
        offset,
        len: name.len(),
    })?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    Ok(())
}

fn body_field_len(len: usize) -> Result<u32, PacketError> {
    u32::try_from(len).map_err(|_| PacketError::BodyTooLarge { len })
}

fn check_range(range: &OriginRange) -> Result<(), PacketError> {
    if range.first == 0 || range.first > range.last {
        return Err(PacketError::InvalidRange {
            origin: range.origin.clone(),
            first: range.first,
            last: range.last,
        });
    }
    Ok(())
}

/// The ranges an encoder writes: one per origin, ordered by origin name; refuses
/// changes whose sequence numbers do not climb by one per origin.
fn ranges_of(changes: &[Change]) -> Result<Vec<OriginRange>, PacketError> {
    let mut ranges: BTreeMap<&str, OriginRange> = BTreeMap::new();
    for (index, change) in changes.iter().enumerate() {
        let seq = change.seq;
        match ranges.get_mut(change.origin.as_str()) {
            None => {
                let range = OriginRange {
                    origin: change.origin.clone(),
                    first: seq,
                    last: seq,
                };
                check_range(&range)?;
                ranges.insert(&change.origin, range);
            }
            Some(range) if seq <= range.last => {
                return Err(PacketError::SeqNotIncreasing {
                    index,
                    origin: change.origin.clone(),
                    seq,
                    previous: range.last,
                });
            }
            // `seq > range.last` here, so the subtraction cannot underflow.
            Some(range) if seq - range.last != 1 => {
                return Err(PacketError::SeqGap {
                    index,
                    origin: change.origin.clone(),
                    seq,
                    expected: range.last.saturating_add(1),
                });
            }
            Some(range) => range.last = seq,
        }
    }
    Ok(ranges.into_values().collect())
}

/// Checks that the ranges describe the changes exactly: every change inside its
/// origin's range, each origin's changes climbing by one from `first` to `last`.
fn check_changes(ranges: &[OriginRange], changes: &[Change]) -> Result<(), PacketError> {
    // Per origin: its range, the last seq seen and how many changes were seen.
    let mut progress: BTreeMap<&str, (&OriginRange, Option<u64>, u64)> = ranges
        .iter()
        .map(|range| (range.origin.as_str(), (range, None, 0)))
        .collect();

    for (index, change) in changes.iter().enumerate() {
        let seq = change.seq;
        let Some((range, previous, count)) = progress.get_mut(change.origin.as_str()) else {
            return Err(PacketError::OriginNotInRanges {
                index,
                origin: change.origin.clone(),
            });
        };
        if seq < range.first || seq > range.last {
            return Err(PacketError::ChangeOutsideRange {
                index,
                origin: change.origin.clone(),
                seq,
                first: range.first,
                last: range.last,
            });
        }
        let expected = match *previous {
            None => range.first,
            Some(previous) if seq <= previous => {
                return Err(PacketError::SeqNotIncreasing {
                    index,
                    origin: change.origin.clone(),
                    seq,
                    previous,
                });
            }
            Some(previous) => previous.saturating_add(1),
        };
        if seq != expected {
            return Err(PacketError::SeqGap {
                index,
                origin: change.origin.clone(),
                seq,
                expected,
            });
        }
        *previous = Some(seq);
        *count = count.saturating_add(1);
    }

    for (range, previous, count) in progress.into_values() {
        match previous {
            None => {
                return Err(PacketError::RangeWithoutChanges {
                    origin: range.origin.clone(),
                });
            }
            Some(previous) if previous != range.last => {
                return Err(PacketError::RangeCountMismatch {
                    origin: range.origin.clone(),
                    first: range.first,
                    last: range.last,
                    count,
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::change::{FieldValue, ItemKind, ItemState, Membership, Operation};

    const KEY: &[u8] = b"family-secret-of-sampl-0123456789";

    fn secret() -> FamilySecret {
        FamilySecret::from_bytes(KEY).expect("a long enough secret")
    }

    fn header() -> PacketHeader {
        PacketHeader {
            packet_version: 11,
            family: "sampl".to_owned(),
            sender: "paris".to_owned(),
            sender_incarnation: 3,
            target: "tokyo".to_owned(),
            target_incarnation: 1,
        }
    }

    fn put(origin: &str, seq: u64, id: &str) -> Change {
        let mut fields = BTreeMap::new();
        fields.insert(
            "Headline".to_owned(),
            FieldValue::String(format!("{id} at {origin}")),
        );
        Change {
            origin: origin.to_owned(),
            seq,
            op: Operation::PutItem {
                item: ItemState {
                    kind: ItemKind::Record,
                    id: id.to_owned(),
                    item_type: "Defect".to_owned(),
                    fields,
                    master: origin.to_owned(),
                    version: seq,
                    deleted: false,
                    owner: None,
                    schema_version: 1,
                },
                forced_from: None,
            },
        }
    }

    fn join(origin: &str, seq: u64, replica: &str) -> Change {
        Change {
            origin: origin.to_owned(),
            seq,
            op: Operation::Membership {
                membership: Membership {
                    replica: replica.to_owned(),
                    id_tag: "T".to_owned(),
                    active: true,
                },
            },
        }
    }

    fn encoded(changes: &[Change]) -> Vec<u8> {
        encode(&header(), changes, &secret()).expect("a valid packet")
    }

    #[test]
    fn packet_with_several_origins_round_trips() {
        // Log order interleaves origins; each origin's numbers still climb by one.
        let changes = vec![
            put("paris", 7, "SAMPL00007"),
            put("berlin", 40, "SAMPL00040B"),
            join("tokyo", 2, "rome"),
            put("paris", 8, "SAMPL00008"),
            put("berlin", 41, "SAMPL00041B"),
            put("paris", 9, "SAMPL00009"),
        ];
        let bytes = encoded(&changes);
        let packet = decode(&bytes, &secret(), &Limits::default()).expect("decodes");
        assert_eq!(packet.header, header());
        assert_eq!(packet.changes, changes);
        assert_eq!(
            packet.ranges,
            vec![
                OriginRange {
                    origin: "berlin".to_owned(),
                    first: 40,
                    last: 41
                },
                OriginRange {
                    origin: "paris".to_owned(),
                    first: 7,
                    last: 9
                },
                OriginRange {
                    origin: "tokyo".to_owned(),
                    first: 2,
                    last: 2
                },
            ]
        );
    }

    #[test]
    fn empty_packet_round_trips() {
        let bytes = encoded(&[]);
        let packet = decode(&bytes, &secret(), &Limits::default()).expect("decodes");
        assert_eq!(packet.header, header());
        assert!(packet.ranges.is_empty());
        assert!(packet.changes.is_empty());
    }

    #[test]
    fn peek_header_reads_header_and_ranges_without_the_secret() {
        let bytes = encoded(&[put("paris", 1, "SAMPL00001"), put("paris", 2, "SAMPL00002")]);
        let (peeked, ranges) = peek_header(&bytes).expect("peeks");
        assert_eq!(peeked, header());
        assert_eq!(
            ranges,
            vec![OriginRange {
                origin: "paris".to_owned(),
                first: 1,
                last: 2
            }]
        );
    }

    #[test]
    fn peek_header_still_sees_corruption() {
        let mut bytes = encoded(&[put("paris", 1, "SAMPL00001")]);
        if let Some(byte) = bytes.get_mut(12) {
            *byte ^= 0x20;
        }
        assert!(matches!(
            peek_header(&bytes),
            Err(PacketError::Corrupted { .. })
        ));
    }

    #[test]
    fn a_different_secret_is_refused() {
        let bytes = encoded(&[put("paris", 1, "SAMPL00001")]);
        let other = FamilySecret::from_bytes(b"another-family-secret-0123456789").expect("long");
        assert_eq!(
            decode(&bytes, &other, &Limits::default()),
            Err(PacketError::NotSigned)
        );
    }

    #[test]
    fn secret_debug_output_hides_the_bytes() {
        let shown = format!("{:?}", secret());
        assert_eq!(shown, "FamilySecret(<redacted>)");
        assert!(!shown.contains("family-secret"));
        let message = PacketError::NotSigned.to_string();
        assert!(!message.contains("family-secret"));
    }

    #[test]
    fn short_secret_is_refused() {
        assert_eq!(
            FamilySecret::from_bytes(b"fifteen bytes!!").map(|_| ()),
            Err(PacketError::SecretTooShort { len: 15, min: 16 })
        );
        assert!(FamilySecret::from_bytes(&[0u8; 16]).is_ok());
    }

    #[test]
    fn encode_refuses_seqs_that_do_not_climb_by_one() {
        let cases = [
            (
                vec![put("paris", 3, "A"), put("paris", 3, "B")],
                PacketError::SeqNotIncreasing {
                    index: 1,
                    origin: "paris".to_owned(),
                    seq: 3,
                    previous: 3,
                },
            ),
            (
                vec![
                    put("paris", 3, "A"),
                    put("berlin", 1, "B"),
                    put("paris", 2, "C"),
                ],
                PacketError::SeqNotIncreasing {
                    index: 2,
                    origin: "paris".to_owned(),
                    seq: 2,
                    previous: 3,
                },
            ),
            (
                vec![put("paris", 3, "A"), put("paris", 5, "B")],
                PacketError::SeqGap {
                    index: 1,
                    origin: "paris".to_owned(),
                    seq: 5,
                    expected: 4,
                },
            ),
            (
                vec![put("paris", 0, "A")],
                PacketError::InvalidRange {
                    origin: "paris".to_owned(),
                    first: 0,
                    last: 0,
                },
            ),
        ];
        for (changes, expected) in cases {
            assert_eq!(encode(&header(), &changes, &secret()), Err(expected));
        }
    }

    #[test]
    fn encode_refuses_names_the_decoder_would_refuse() {
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        let mut empty_family = header();
        empty_family.family = String::new();
        assert_eq!(
            encode(&empty_family, &[], &secret()),
            Err(PacketError::NameEmpty {
                field: PacketField::Family,
                offset: 8
            })
        );
        let mut long_target = header();
        long_target.target = long.clone();
        assert_eq!(
            encode(&long_target, &[], &secret()),
            Err(PacketError::NameTooLong {
                field: PacketField::Target,
                offset: 22,
                len: MAX_NAME_BYTES + 1
            })
        );
        assert!(matches!(
            encode(&header(), &[put("", 1, "A")], &secret()),
            Err(PacketError::NameEmpty {
                field: PacketField::RangeOrigin(0),
                ..
            })
        ));
        assert!(matches!(
            encode(&header(), &[put(&long, 1, "A")], &secret()),
            Err(PacketError::NameTooLong {
                field: PacketField::RangeOrigin(0),
                ..
            })
        ));
        // The longest allowed name still round-trips.
        let mut longest = header();
        longest.sender = "s".repeat(MAX_NAME_BYTES);
        let bytes = encode(&longest, &[], &secret()).expect("encodes");
        let packet = decode(&bytes, &secret(), &Limits::default()).expect("decodes");
        assert_eq!(packet.header, longest);
    }

    #[test]
    fn encode_refuses_more_origins_than_the_count_holds() {
        let changes: Vec<Change> = (0..=usize::from(u16::MAX))
            .map(|i| join(&format!("r{i}"), 1, "x"))
            .collect();
        assert_eq!(
            encode(&header(), &changes, &secret()),
            Err(PacketError::TooManyOrigins { count: 65536 })
        );
    }

    #[test]
    fn body_lengths_beyond_u32_are_refused() {
        let too_long = usize::try_from(u64::from(u32::MAX) + 1).unwrap_or(usize::MAX);
        assert_eq!(
            body_field_len(too_long),
            Err(PacketError::BodyTooLarge { len: too_long })
        );
        assert_eq!(body_field_len(5), Ok(5));
    }

    #[test]
    fn header_overhead_of_a_typical_packet() {
        // Family "sampl", sender "paris", target "tokyo", two origins.
        let changes = vec![
            put("paris", 1, "SAMPL00001"),
            put("berlin", 1, "SAMPL00001B"),
        ];
        let bytes = encoded(&changes);
        let json = serde_json::to_vec(&changes).expect("serialises");
        let body = zstd::bulk::compress(&json, COMPRESSION_LEVEL).expect("compresses");
        // 80 fixed bytes, 15 bytes of names, 23 + 24 bytes of ranges.
        assert_eq!(bytes.len() - body.len(), 142);
        assert_eq!(MIN_PACKET_BYTES, 83);
    }

    #[test]
    fn layout_matches_the_documented_offsets() {
        let bytes = encoded(&[]);
        assert_eq!(bytes.get(0..4), Some(&b"MSPK"[..]));
        assert_eq!(bytes.get(4..6), Some(&[0u8, 1][..]));
        assert_eq!(bytes.get(6..8), Some(&[0u8, 11][..]));
        assert_eq!(bytes.get(8..15), Some(&b"\x00\x05sampl"[..]));
        // The checksum is the first 8 bytes of SHA-256 over everything before it.
        let split = bytes.len() - CHECKSUM_BYTES;
        let (signed, sum) = bytes.split_at(split);
        assert_eq!(checksum(signed).as_slice(), sum);
    }
}
