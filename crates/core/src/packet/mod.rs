//! Packets: the unit of synchronisation between replicas, and their wire format.

pub mod change;
pub mod codec;

pub use codec::{
    FamilySecret, Limits, OriginRange, Packet, PacketError, PacketField, PacketHeader, decode,
    encode, peek_header,
};
