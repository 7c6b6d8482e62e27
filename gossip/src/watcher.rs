//! Driver hooks: the `TableWatcher` contract (libnetwork's `EventNotify` / `DecodeTableEntry`),
//! `ObjectType`, and a dispatcher that routes table events to the watcher of each table.

use std::collections::BTreeMap;

use crate::event::TableEvent;

/// What kind of object a table's entries describe (libnetwork's `driverapi.ObjectType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(i32)]
pub enum ObjectType {
    Endpoint = 1,
    Network = 2,
    Opaque = 3,
}

impl ObjectType {
    /// The validity check of the driver API: only the three defined values are object types.
    pub fn is_valid(raw: i32) -> bool {
        Self::from_raw(raw).is_some()
    }

    pub fn from_raw(raw: i32) -> Option<Self> {
        match raw {
            1 => Some(ObjectType::Endpoint),
            2 => Some(ObjectType::Network),
            3 => Some(ObjectType::Opaque),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ObjectType::Endpoint => "endpoint",
            ObjectType::Network => "network",
            ObjectType::Opaque => "opaque",
        }
    }
}

/// The version a table event is about: its Lamport time and owner. `(ltime, owner)` is a total
/// order on versions that every node computes alike, so drivers resolve a handover (two
/// records for one address) the same way everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version<'a> {
    pub ltime: u64,
    pub owner: &'a str,
}

/// A driver's view of the tables it registered.
///
/// `event_notify` is called for every applied change of a registered table, in order: a create
/// (`prev` is `None`), updates, a delete (`value` is `None`); `prev` is always the value this
/// watcher saw last for that key. `version` is the version now in force: for a delete, the
/// tombstone's (for a hide or a detach, the hidden version's). `decode_table_entry` turns a raw value into something a person
/// can read: the object id it belongs to and a map of fields (the overlay driver returns the
/// endpoint id and `{"Host IP": <VTEP>}`). A watcher that only decodes keeps the default
/// `event_notify`, which ignores the event.
pub trait TableWatcher {
    fn event_notify(
        &mut self,
        _nid: &str,
        _table: &str,
        _key: &str,
        _prev: Option<&[u8]>,
        _value: Option<&[u8]>,
        _version: Version<'_>,
    ) {
    }

    fn decode_table_entry(&self, table: &str, key: &str, value: &[u8]) -> (String, BTreeMap<String, String>);
}

/// Routes table events to the watcher registered for each table.
#[derive(Default)]
pub struct Watchers {
    by_table: BTreeMap<String, (ObjectType, Box<dyn TableWatcher + Send>)>,
}

impl std::fmt::Debug for Watchers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.by_table.iter().map(|(t, (o, _))| (t, o))).finish()
    }
}

impl Watchers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `watcher` for `table`; replaces an earlier registration of the same table.
    pub fn register(&mut self, table: &str, object_type: ObjectType, watcher: Box<dyn TableWatcher + Send>) {
        self.by_table.insert(table.to_string(), (object_type, watcher));
    }

    pub fn object_type(&self, table: &str) -> Option<ObjectType> {
        self.by_table.get(table).map(|(o, _)| *o)
    }

    /// Delivers one table event to its table's watcher; returns whether one was registered.
    pub fn dispatch(&mut self, ev: &TableEvent) -> bool {
        match self.by_table.get_mut(&ev.table) {
            Some((_, w)) => {
                let version = Version { ltime: ev.ltime, owner: &ev.owner };
                w.event_notify(
                    &ev.network,
                    &ev.table,
                    &ev.key,
                    ev.prev.as_deref(),
                    ev.value.as_deref(),
                    version,
                );
                true
            }
            None => false,
        }
    }

    /// The registered watcher's decoding of a value, if the table has one.
    pub fn decode(&self, table: &str, key: &str, value: &[u8]) -> Option<(String, BTreeMap<String, String>)> {
        self.by_table.get(table).map(|(_, w)| w.decode_table_entry(table, key, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_type_validity_matches_the_driver_api() {
        assert!(!ObjectType::is_valid(0));
        assert!(ObjectType::is_valid(1) && ObjectType::is_valid(2) && ObjectType::is_valid(3));
        assert!(!ObjectType::is_valid(4));
        assert_eq!(ObjectType::from_raw(2), Some(ObjectType::Network));
    }
}
