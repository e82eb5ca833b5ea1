//! The packet wire format seen from outside: a second writer built from
//! `docs/packet-format.md` crafts every kind of bad packet, and property tests check
//! that decoding refuses damage and never panics, whatever the bytes.

use multisite::packet::change::{
    Change, FieldValue, ItemKind, ItemState, Membership, Operation, SchemaVersion,
};
use multisite::packet::{
    FamilySecret, Limits, Packet, PacketError, PacketField, PacketHeader, decode, encode,
    peek_header,
};
use proptest::prelude::*;
use ring::{digest, hmac};
use std::collections::BTreeMap;
use std::sync::OnceLock;

const KEY: &[u8] = b"family-secret-of-sampl-0123456789";
const TRAILER: usize = 32 + 8;

fn secret() -> FamilySecret {
    FamilySecret::from_bytes(KEY).expect("a long enough secret")
}

/// Small enough that a body bomb is cheap to build and still far over the cap.
fn small_limits() -> Limits {
    Limits {
        max_packet_bytes: 1024 * 1024,
        max_body_bytes: 64 * 1024,
    }
}

/// Appends the MAC and the checksum, as a sender holding the secret would.
fn sign(content: &[u8]) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, KEY);
    let mut out = content.to_vec();
    out.extend_from_slice(hmac::sign(&key, content).as_ref());
    let sum = digest::digest(&digest::SHA256, &out);
    out.extend(sum.as_ref().iter().take(8));
    out
}

/// The signed part of a packet: everything before the MAC.
fn content_of(bytes: &[u8]) -> Vec<u8> {
    bytes
        .get(..bytes.len().saturating_sub(TRAILER))
        .unwrap_or_default()
        .to_vec()
}

fn compress(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 3).expect("compresses")
}

/// One MiB of zeros, compressed to a few hundred bytes.
fn bomb() -> &'static [u8] {
    static BOMB: OnceLock<Vec<u8>> = OnceLock::new();
    BOMB.get_or_init(|| compress(&vec![0u8; 1024 * 1024]))
}

/// Every field of a packet as raw bytes, so that any of them can be made wrong.
#[derive(Clone, Debug)]
struct Raw {
    magic: Vec<u8>,
    format: u16,
    packet_version: u16,
    family: Vec<u8>,
    sender: Vec<u8>,
    target: Vec<u8>,
    sender_incarnation: u64,
    target_incarnation: u64,
    ranges: Vec<(Vec<u8>, u64, u64)>,
    decoded_len: Option<u32>,
    body_len: Option<u32>,
    body: Vec<u8>,
    json_len: usize,
    after_body: Vec<u8>,
}

impl Raw {
    fn new(header: &PacketHeader, changes: &[Change]) -> Raw {
        let mut ranges: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for change in changes {
            ranges
                .entry(change.origin.clone())
                .and_modify(|r| r.1 = change.seq)
                .or_insert((change.seq, change.seq));
        }
        let json = serde_json::to_vec(changes).expect("serialises");
        Raw {
            magic: b"MSPK".to_vec(),
            format: 1,
            packet_version: header.packet_version,
            family: header.family.as_bytes().to_vec(),
            sender: header.sender.as_bytes().to_vec(),
            target: header.target.as_bytes().to_vec(),
            sender_incarnation: header.sender_incarnation,
            target_incarnation: header.target_incarnation,
            ranges: ranges
                .into_iter()
                .map(|(origin, (first, last))| (origin.into_bytes(), first, last))
                .collect(),
            decoded_len: None,
            body_len: None,
            body: compress(&json),
            json_len: json.len(),
            after_body: Vec::new(),
        }
    }

    fn with_json(mut self, json: &[u8]) -> Raw {
        self.body = compress(json);
        self.json_len = json.len();
        self
    }

    fn content(&self) -> Vec<u8> {
        fn name(out: &mut Vec<u8>, raw: &[u8]) {
            let len = u16::try_from(raw.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(raw);
        }
        let mut out = self.magic.clone();
        out.extend_from_slice(&self.format.to_be_bytes());
        out.extend_from_slice(&self.packet_version.to_be_bytes());
        name(&mut out, &self.family);
        name(&mut out, &self.sender);
        name(&mut out, &self.target);
        out.extend_from_slice(&self.sender_incarnation.to_be_bytes());
        out.extend_from_slice(&self.target_incarnation.to_be_bytes());
        let count = u16::try_from(self.ranges.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for (origin, first, last) in &self.ranges {
            name(&mut out, origin);
            out.extend_from_slice(&first.to_be_bytes());
            out.extend_from_slice(&last.to_be_bytes());
        }
        let json_len = u32::try_from(self.json_len).unwrap_or(u32::MAX);
        out.extend_from_slice(&self.decoded_len.unwrap_or(json_len).to_be_bytes());
        let body_len = u32::try_from(self.body.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&self.body_len.unwrap_or(body_len).to_be_bytes());
        out.extend_from_slice(&self.body);
        out.extend_from_slice(&self.after_body);
        out
    }

    fn signed(&self) -> Vec<u8> {
        sign(&self.content())
    }
}

fn header() -> PacketHeader {
    PacketHeader {
        packet_version: 12,
        family: "sampl".to_owned(),
        sender: "paris".to_owned(),
        sender_incarnation: 2,
        target: "tokyo".to_owned(),
        target_incarnation: 5,
    }
}

fn join(origin: &str, seq: u64) -> Change {
    Change {
        origin: origin.to_owned(),
        seq,
        op: Operation::Membership {
            membership: Membership {
                replica: "rome".to_owned(),
                id_tag: "R".to_owned(),
                active: true,
            },
        },
    }
}

/// paris 4..=5 and berlin 1, interleaved.
fn sample_changes() -> Vec<Change> {
    vec![join("paris", 4), join("berlin", 1), join("paris", 5)]
}

fn sample() -> Raw {
    Raw::new(&header(), &sample_changes())
}

fn json_of(changes: &[Change]) -> Vec<u8> {
    serde_json::to_vec(changes).expect("serialises")
}

type Check = fn(&PacketError) -> bool;

#[test]
fn the_independent_writer_agrees_with_encode() {
    let ours = encode(&header(), &sample_changes(), &secret()).expect("encodes");
    assert_eq!(sample().signed(), ours);
}

#[test]
fn each_refusal_comes_from_its_own_crafted_input() {
    let valid = sample().signed();
    let default = Limits::default();
    let mut flipped = valid.clone();
    if let Some(byte) = flipped.get_mut(60) {
        *byte ^= 0x01;
    }
    let other_secret = {
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"another-family-secret-0123456789");
        let content = content_of(&valid);
        let mut out = content.clone();
        out.extend_from_slice(hmac::sign(&key, &content).as_ref());
        let sum = digest::digest(&digest::SHA256, &out);
        out.extend(sum.as_ref().iter().take(8));
        out
    };
    let mut appended = valid.clone();
    appended.push(0);

    let cases: Vec<(&str, Vec<u8>, Limits, Check)> = vec![
        ("empty input", Vec::new(), default, |e| {
            matches!(e, PacketError::TooShort { len: 0, .. })
        }),
        ("magic only", b"MSPK".to_vec(), default, |e| {
            matches!(e, PacketError::TooShort { len: 4, .. })
        }),
        (
            "short after a good prefix",
            b"MSPK\x00\x01abc".to_vec(),
            default,
            |e| matches!(e, PacketError::TooShort { len: 9, min: 83 }),
        ),
        (
            "bad magic",
            Raw {
                magic: b"MSPX".to_vec(),
                ..sample()
            }
            .signed(),
            default,
            |e| matches!(e, PacketError::BadMagic { found } if found == "MSPX"),
        ),
        (
            "bad magic, short",
            b"GIF".to_vec(),
            default,
            |e| matches!(e, PacketError::BadMagic { found } if found == "GIF"),
        ),
        (
            "future container format",
            Raw {
                format: 2,
                ..sample()
            }
            .signed(),
            default,
            |e| matches!(e, PacketError::UnsupportedFormat { version: 2 }),
        ),
        (
            "oversize",
            valid.clone(),
            Limits {
                max_packet_bytes: 100,
                ..default
            },
            |e| matches!(e, PacketError::Oversize { max: 100, .. }),
        ),
        ("flipped bit", flipped, default, |e| {
            matches!(e, PacketError::Corrupted { .. })
        }),
        (
            "cut short",
            valid.get(..valid.len() - 1).unwrap_or_default().to_vec(),
            default,
            |e| matches!(e, PacketError::Corrupted { .. }),
        ),
        ("extended", appended, default, |e| {
            matches!(e, PacketError::Corrupted { .. })
        }),
        ("another family's secret", other_secret, default, |e| {
            matches!(e, PacketError::NotSigned)
        }),
        (
            "signed content cut inside a range",
            sign(sample().content().get(..80).unwrap_or_default()),
            default,
            |e| {
                matches!(
                    e,
                    PacketError::Truncated {
                        field: PacketField::RangeFirst(1),
                        offset: 78,
                        needed: 8,
                        available: 2
                    }
                )
            },
        ),
        (
            "body length past the end",
            Raw {
                body_len: Some(5000),
                ..sample()
            }
            .signed(),
            default,
            |e| {
                matches!(
                    e,
                    PacketError::Truncated {
                        field: PacketField::Body,
                        needed: 5000,
                        ..
                    }
                )
            },
        ),
        (
            "signed content cut inside the sender name",
            {
                let raw = Raw {
                    family: vec![b'f'; 120],
                    ..sample()
                };
                sign(raw.content().get(..134).unwrap_or_default())
            },
            default,
            |e| {
                matches!(
                    e,
                    PacketError::Truncated {
                        field: PacketField::Sender,
                        offset: 132,
                        needed: 5,
                        available: 2
                    }
                )
            },
        ),
        (
            "bytes after the body",
            Raw {
                after_body: vec![1, 2, 3],
                ..sample()
            }
            .signed(),
            default,
            |e| matches!(e, PacketError::TrailingBytes { count: 3, .. }),
        ),
        (
            "sender name not UTF-8",
            Raw {
                sender: vec![b'p', 0xff, b'r'],
                ..sample()
            }
            .signed(),
            default,
            |e| {
                matches!(
                    e,
                    PacketError::NameNotUtf8 {
                        field: PacketField::Sender,
                        offset: 18
                    }
                )
            },
        ),
        (
            "empty target name",
            Raw {
                target: Vec::new(),
                ..sample()
            }
            .signed(),
            default,
            |e| {
                matches!(
                    e,
                    PacketError::NameEmpty {
                        field: PacketField::Target,
                        offset: 22
                    }
                )
            },
        ),
        (
            "family name too long",
            Raw {
                family: vec![b'f'; 254],
                ..sample()
            }
            .signed(),
            default,
            |e| {
                matches!(
                    e,
                    PacketError::NameTooLong {
                        field: PacketField::Family,
                        offset: 8,
                        len: 254
                    }
                )
            },
        ),
        (
            "range first above last",
            {
                let mut raw = sample();
                raw.ranges = vec![(b"berlin".to_vec(), 1, 1), (b"paris".to_vec(), 5, 4)];
                raw.signed()
            },
            default,
            |e| {
                matches!(
                    e,
                    PacketError::InvalidRange {
                        first: 5,
                        last: 4,
                        ..
                    }
                )
            },
        ),
        (
            "range starting at zero",
            {
                let mut raw = sample();
                raw.ranges = vec![(b"berlin".to_vec(), 0, 1), (b"paris".to_vec(), 4, 5)];
                raw.signed()
            },
            default,
            |e| {
                matches!(
                    e,
                    PacketError::InvalidRange {
                        first: 0,
                        last: 1,
                        ..
                    }
                )
            },
        ),
        (
            "duplicate origin",
            {
                let mut raw = sample();
                raw.ranges = vec![
                    (b"berlin".to_vec(), 1, 1),
                    (b"paris".to_vec(), 4, 5),
                    (b"berlin".to_vec(), 1, 1),
                ];
                raw.signed()
            },
            default,
            |e| matches!(e, PacketError::DuplicateOrigin { origin, .. } if origin == "berlin"),
        ),
        (
            "declared body over the cap",
            Raw {
                decoded_len: Some(1024 * 1024 * 1024 + 1),
                ..sample()
            }
            .signed(),
            default,
            |e| matches!(e, PacketError::BodyOverCap { .. }),
        ),
        (
            "zstd bomb over the cap",
            Raw {
                body: bomb().to_vec(),
                json_len: 1024 * 1024,
                ..sample()
            }
            .signed(),
            small_limits(),
            |e| {
                matches!(
                    e,
                    PacketError::BodyOverCap {
                        declared: 1048576,
                        cap: 65536
                    }
                )
            },
        ),
        (
            "zstd bomb under a small declared length",
            Raw {
                body: bomb().to_vec(),
                json_len: 1000,
                ..sample()
            }
            .signed(),
            default,
            |e| matches!(e, PacketError::Decompression { declared: 1000, .. }),
        ),
        (
            "body shorter than declared",
            Raw {
                decoded_len: Some(40_000),
                ..sample()
            }
            .signed(),
            default,
            |e| {
                matches!(
                    e,
                    PacketError::Decompression {
                        declared: 40_000,
                        ..
                    }
                )
            },
        ),
        (
            "body not zstd",
            Raw {
                body: b"[not compressed]".to_vec(),
                ..sample()
            }
            .signed(),
            default,
            |e| matches!(e, PacketError::Decompression { .. }),
        ),
        (
            "body not JSON",
            sample().with_json(b"{\"origin\": ").signed(),
            default,
            |e| matches!(e, PacketError::BadBody { .. }),
        ),
        (
            "body JSON but not changes",
            sample()
                .with_json(br#"[{"origin":"paris","seq":4,"op":{"type":"nothing"}}]"#)
                .signed(),
            default,
            |e| matches!(e, PacketError::BadBody { .. }),
        ),
        (
            "change from an origin without a range",
            sample()
                .with_json(&json_of(&[
                    join("paris", 4),
                    join("berlin", 1),
                    join("rome", 1),
                    join("paris", 5),
                ]))
                .signed(),
            default,
            |e| matches!(e, PacketError::OriginNotInRanges { index: 2, origin } if origin == "rome"),
        ),
        (
            "change outside its range",
            sample()
                .with_json(&json_of(&[join("paris", 4), join("berlin", 2)]))
                .signed(),
            default,
            |e| {
                matches!(
                    e,
                    PacketError::ChangeOutsideRange {
                        index: 1,
                        seq: 2,
                        first: 1,
                        last: 1,
                        ..
                    }
                )
            },
        ),
        (
            "seqs going down",
            sample()
                .with_json(&json_of(&[
                    join("paris", 4),
                    join("paris", 5),
                    join("berlin", 1),
                    join("paris", 4),
                ]))
                .signed(),
            default,
            |e| {
                matches!(
                    e,
                    PacketError::SeqNotIncreasing {
                        index: 3,
                        seq: 4,
                        previous: 5,
                        ..
                    }
                )
            },
        ),
        (
            "seqs with a gap",
            {
                let mut raw = sample().with_json(&json_of(&[
                    join("paris", 4),
                    join("berlin", 1),
                    join("paris", 6),
                ]));
                raw.ranges = vec![(b"berlin".to_vec(), 1, 1), (b"paris".to_vec(), 4, 6)];
                raw.signed()
            },
            default,
            |e| {
                matches!(
                    e,
                    PacketError::SeqGap {
                        index: 2,
                        seq: 6,
                        expected: 5,
                        ..
                    }
                )
            },
        ),
        (
            "range with no changes",
            {
                let mut raw = sample();
                raw.ranges.push((b"rome".to_vec(), 1, 3));
                raw.signed()
            },
            default,
            |e| matches!(e, PacketError::RangeWithoutChanges { origin } if origin == "rome"),
        ),
        (
            "range longer than the changes",
            {
                let mut raw = sample();
                raw.ranges = vec![(b"berlin".to_vec(), 1, 1), (b"paris".to_vec(), 4, 7)];
                raw.signed()
            },
            default,
            |e| {
                matches!(
                    e,
                    PacketError::RangeCountMismatch {
                        first: 4,
                        last: 7,
                        count: 2,
                        ..
                    }
                )
            },
        ),
    ];

    let mut failures = Vec::new();
    for (label, bytes, limits, check) in &cases {
        match decode(bytes, &secret(), limits) {
            Err(error) if check(&error) => {
                let message = error.to_string();
                if message.is_empty() || message.contains("family-secret") {
                    failures.push(format!("{label}: unfit message {message:?}"));
                }
            }
            other => failures.push(format!("{label}: got {other:?}")),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn peek_header_refuses_what_it_cannot_read() {
    assert!(matches!(
        peek_header(b"MSPK\x00\x02rest"),
        Err(PacketError::UnsupportedFormat { version: 2 })
    ));
    let bad_name = Raw {
        sender: vec![0xc3],
        ..sample()
    }
    .signed();
    assert!(matches!(
        peek_header(&bad_name),
        Err(PacketError::NameNotUtf8 { .. })
    ));
}

// ---- strategies ----

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,12}"
}

fn header_strategy() -> impl Strategy<Value = PacketHeader> {
    (
        any::<u16>(),
        name(),
        name(),
        any::<u64>(),
        name(),
        any::<u64>(),
    )
        .prop_map(
            |(packet_version, family, sender, sender_incarnation, target, target_incarnation)| {
                PacketHeader {
                    packet_version,
                    family,
                    sender,
                    sender_incarnation,
                    target,
                    target_incarnation,
                }
            },
        )
}

fn operation() -> impl Strategy<Value = Operation> {
    prop_oneof![
        (
            "[A-Z]{5}[0-9]{5}",
            any::<String>(),
            any::<i64>(),
            any::<bool>(),
            1u64..50
        )
            .prop_map(|(id, text, number, deleted, version)| {
                let mut fields = BTreeMap::new();
                fields.insert("Headline".to_owned(), FieldValue::String(text));
                fields.insert("Priority".to_owned(), FieldValue::Integer(number));
                Operation::PutItem {
                    item: ItemState {
                        kind: ItemKind::Record,
                        id,
                        item_type: "Defect".to_owned(),
                        fields,
                        master: "paris".to_owned(),
                        version,
                        deleted,
                        owner: None,
                        schema_version: 1,
                    },
                    forced_from: None,
                }
            }),
        (name(), any::<bool>()).prop_map(|(replica, active)| Operation::Membership {
            membership: Membership {
                replica,
                id_tag: "Q".to_owned(),
                active,
            },
        }),
        (1u64..9).prop_map(|version| Operation::AddSchemaVersion {
            schema: SchemaVersion {
                version,
                package: Some("Interop 1.0".to_owned()),
                record_types: Vec::new(),
            },
        }),
    ]
}

/// Changes from up to four origins, interleaved, each origin's seqs climbing by one
/// from a random start.
fn changes_strategy() -> impl Strategy<Value = Vec<Change>> {
    let origins = ["paris", "berlin", "tokyo", "lyon"];
    (
        prop::collection::vec(1u64..1_000_000, 4),
        prop::collection::vec((0usize..4, operation()), 0..12),
    )
        .prop_map(move |(starts, picks)| {
            let mut next = starts;
            picks
                .into_iter()
                .map(|(o, op)| {
                    let seq = next.get(o).copied().unwrap_or(1);
                    if let Some(n) = next.get_mut(o) {
                        *n += 1;
                    }
                    Change {
                        origin: origins.get(o).copied().unwrap_or("paris").to_owned(),
                        seq,
                        op,
                    }
                })
                .collect()
        })
}

fn packet_strategy() -> impl Strategy<Value = (PacketHeader, Vec<Change>, Vec<u8>)> {
    (header_strategy(), changes_strategy()).prop_map(|(header, changes)| {
        let bytes = encode(&header, &changes, &secret()).expect("generated packets are valid");
        (header, changes, bytes)
    })
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Truncate { len: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
    Duplicate { from: usize, len: usize, to: usize },
    Set { at: usize, byte: u8 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..32).prop_map(|(at, len)| Mutation::Remove { at, len }),
        (any::<usize>(), 1usize..64, any::<usize>())
            .prop_map(|(from, len, to)| Mutation::Duplicate { from, len, to }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
    ]
}

/// Applies a mutation; positions wrap around the current length.
fn mutate(bytes: &mut Vec<u8>, mutation: &Mutation) {
    let len = bytes.len();
    let wrap = |n: usize| n.checked_rem(len).unwrap_or(0);
    match mutation {
        Mutation::Flip { at, bit } => {
            if let Some(byte) = bytes.get_mut(wrap(*at)) {
                *byte ^= 1 << bit;
            }
        }
        Mutation::Truncate { len: keep } => bytes.truncate(keep.checked_rem(len + 1).unwrap_or(0)),
        Mutation::Insert { at, bytes: extra } => {
            let at = wrap(*at);
            bytes.splice(at..at, extra.iter().copied());
        }
        Mutation::Remove { at, len: n } => {
            let at = wrap(*at);
            let end = (at + n).min(len);
            bytes.drain(at..end);
        }
        Mutation::Duplicate { from, len: n, to } => {
            let from = wrap(*from);
            let end = (from + n).min(len);
            let slice: Vec<u8> = bytes.get(from..end).unwrap_or_default().to_vec();
            let to = wrap(*to);
            bytes.splice(to..to, slice);
        }
        Mutation::Set { at, byte } => {
            if let Some(b) = bytes.get_mut(wrap(*at)) {
                *b = *byte;
            }
        }
    }
}

/// When a decode succeeds, what it returns is self-consistent: encoding it again
/// gives a packet that decodes to the same thing.
fn accepted_is_consistent(packet: &Packet) -> Result<(), TestCaseError> {
    let again = encode(&packet.header, &packet.changes, &secret())
        .map_err(|e| TestCaseError::fail(format!("accepted but not re-encodable: {e}")))?;
    let decoded = decode(&again, &secret(), &Limits::default())
        .map_err(|e| TestCaseError::fail(format!("re-encoded but refused: {e}")))?;
    let mut ranges = packet.ranges.clone();
    ranges.sort_by(|a, b| a.origin.cmp(&b.origin));
    prop_assert_eq!(&decoded.ranges, &ranges);
    prop_assert_eq!(&decoded.changes, &packet.changes);
    prop_assert_eq!(&decoded.header, &packet.header);
    Ok(())
}

/// Damage to the signed part that a sender holding the secret could still sign.
#[derive(Clone, Debug)]
enum Resigned {
    /// Raw bytes of the content mutated.
    Content(Vec<Mutation>),
    /// The compressed body replaced by arbitrary bytes.
    GarbageBody(Vec<u8>),
    /// The JSON mutated before compression.
    MutatedJson(Vec<Mutation>),
    /// The body replaced by the bomb, with a declared length.
    Bomb(u32),
    /// The ranges replaced.
    Ranges(Vec<(usize, u64, u64)>),
    /// The declared decoded length replaced.
    DecodedLength(u32),
    /// Two changes swapped in the body, the ranges kept.
    Swap(usize, usize),
    /// One change's seq moved, the ranges kept.
    ShiftSeq(usize, i8),
}

fn resigned() -> impl Strategy<Value = Resigned> {
    prop_oneof![
        prop::collection::vec(mutation(), 1..4).prop_map(Resigned::Content),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Resigned::GarbageBody),
        prop::collection::vec(mutation(), 1..4).prop_map(Resigned::MutatedJson),
        prop_oneof![Just(1024 * 1024), 0u32..70_000, any::<u32>()].prop_map(Resigned::Bomb),
        prop::collection::vec((0usize..5, 0u64..8, 0u64..8), 0..5).prop_map(Resigned::Ranges),
        prop_oneof![0u32..5000, any::<u32>()].prop_map(Resigned::DecodedLength),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Resigned::Swap(a, b)),
        (any::<usize>(), any::<i8>()).prop_map(|(at, delta)| Resigned::ShiftSeq(at, delta)),
    ]
}

fn apply_resigned(header: &PacketHeader, changes: &[Change], damage: &Resigned) -> Vec<u8> {
    let raw = Raw::new(header, changes);
    match damage {
        Resigned::Content(mutations) => {
            let mut content = raw.content();
            for m in mutations {
                mutate(&mut content, m);
            }
            sign(&content)
        }
        Resigned::GarbageBody(body) => Raw {
            body: body.clone(),
            ..raw
        }
        .signed(),
        Resigned::MutatedJson(mutations) => {
            let mut json = json_of(changes);
            for m in mutations {
                mutate(&mut json, m);
            }
            raw.with_json(&json).signed()
        }
        Resigned::Bomb(declared) => Raw {
            body: bomb().to_vec(),
            decoded_len: Some(*declared),
            ..raw
        }
        .signed(),
        Resigned::Ranges(ranges) => {
            let origins = ["paris", "berlin", "tokyo", "lyon", "rome"];
            Raw {
                ranges: ranges
                    .iter()
                    .map(|(o, first, span)| {
                        let origin = origins.get(*o).copied().unwrap_or("paris");
                        (origin.as_bytes().to_vec(), *first, first + span)
                    })
                    .collect(),
                ..raw
            }
            .signed()
        }
        Resigned::DecodedLength(declared) => Raw {
            decoded_len: Some(*declared),
            ..raw
        }
        .signed(),
        Resigned::Swap(a, b) => {
            let mut changed = changes.to_vec();
            let n = changed.len();
            if n > 0 {
                changed.swap(a % n, b % n);
            }
            raw.with_json(&json_of(&changed)).signed()
        }
        Resigned::ShiftSeq(at, delta) => {
            let mut changed = changes.to_vec();
            let n = changed.len();
            if let Some(change) = changed.get_mut(at.checked_rem(n).unwrap_or(0)) {
                change.seq = change.seq.saturating_add_signed(i64::from(*delta));
            }
            raw.with_json(&json_of(&changed)).signed()
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// (a) Arbitrary bytes.
    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        prop_assert!(decode(&bytes, &secret(), &Limits::default()).is_err());
        let _ = peek_header(&bytes);
    }

    /// (a) Arbitrary bytes behind a good prefix, signed, so the header parser sees them.
    #[test]
    fn random_signed_content_never_panics(tail in prop::collection::vec(any::<u8>(), 0..400)) {
        let mut content = b"MSPK\x00\x01".to_vec();
        content.extend_from_slice(&tail);
        let bytes = sign(&content);
        if let Ok(packet) = decode(&bytes, &secret(), &small_limits()) {
            accepted_is_consistent(&packet)?;
        }
        let _ = peek_header(&bytes);
    }

    /// A single flipped bit anywhere is refused, and named as what it is.
    #[test]
    fn a_flipped_bit_is_refused((_, _, bytes) in packet_strategy(), at in any::<usize>(), bit in 0u8..8) {
        let mut damaged = bytes.clone();
        let at = at % damaged.len();
        if let Some(byte) = damaged.get_mut(at) {
            *byte ^= 1 << bit;
        }
        let result = decode(&damaged, &secret(), &Limits::default());
        prop_assert!(
            matches!(
                result,
                Err(PacketError::Corrupted { .. }
                    | PacketError::BadMagic { .. }
                    | PacketError::UnsupportedFormat { .. })
            ),
            "bit {} of byte {} flipped: {:?}", bit, at, result
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// (b) Valid packets mutated in transit: refused unless the bytes came out the same.
    #[test]
    fn mutated_packets_are_refused_unless_unchanged(
        (header, changes, bytes) in packet_strategy(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let mut damaged = bytes.clone();
        for m in &mutations {
            mutate(&mut damaged, m);
        }
        match decode(&damaged, &secret(), &Limits::default()) {
            Ok(packet) => {
                prop_assert_eq!(&damaged, &bytes);
                prop_assert_eq!(packet.header, header);
                prop_assert_eq!(packet.changes, changes);
            }
            Err(_) => prop_assert_ne!(&damaged, &bytes),
        }
        let _ = peek_header(&damaged);
    }

    /// (c) Damage signed with the right secret reaches the checks past the MAC
    /// without a panic, and whatever is accepted is consistent.
    #[test]
    fn resigned_damage_never_panics(
        (header, changes, _) in packet_strategy(),
        damage in resigned(),
    ) {
        let bytes = apply_resigned(&header, &changes, &damage);
        if let Ok(packet) = decode(&bytes, &secret(), &small_limits()) {
            accepted_is_consistent(&packet)?;
        }
        let _ = peek_header(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Every valid packet decodes to what was encoded, and peeking agrees.
    #[test]
    fn valid_packets_round_trip((header, changes, bytes) in packet_strategy()) {
        let packet = decode(&bytes, &secret(), &Limits::default())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&packet.header, &header);
        prop_assert_eq!(&packet.changes, &changes);
        let (peeked, ranges) = peek_header(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(peeked, header);
        prop_assert_eq!(ranges, packet.ranges);
    }
}

/// Guards the fuzzing itself: the re-signed damage must keep reaching the checks
/// past the MAC, or `resigned_damage_never_panics` would quietly test little.
#[test]
fn resigned_damage_reaches_the_deep_checks() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use std::collections::BTreeSet;

    let mut runner = TestRunner::deterministic();
    let strategy = (packet_strategy(), resigned());
    let mut seen = BTreeSet::new();
    for _ in 0..3000 {
        let ((header, changes, _), damage) =
            strategy.new_tree(&mut runner).expect("generates").current();
        let bytes = apply_resigned(&header, &changes, &damage);
        let outcome = match decode(&bytes, &secret(), &small_limits()) {
            Ok(_) => "Ok".to_owned(),
            Err(e) => format!("{e:?}")
                .split([' ', '{', '('])
                .next()
                .unwrap_or_default()
                .to_owned(),
        };
        seen.insert(outcome);
    }
    for expected in [
        "Ok",
        "Truncated",
        "TrailingBytes",
        "InvalidRange",
        "DuplicateOrigin",
        "BodyOverCap",
        "Decompression",
        "BadBody",
        "OriginNotInRanges",
        "ChangeOutsideRange",
        "RangeWithoutChanges",
        "RangeCountMismatch",
        "SeqNotIncreasing",
        "SeqGap",
    ] {
        assert!(
            seen.contains(expected),
            "{expected} never reached; saw {seen:?}"
        );
    }
}
