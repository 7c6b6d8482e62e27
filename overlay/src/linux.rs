//! The Linux data plane (netlink).
