//! Inspection commands. They read the pinned maps directly, like bpftool, so they answer while
//! the agent is down; human tables by default, JSON for scripts.

pub mod backends;
pub mod conntrack;
pub mod plan;
pub mod services;

use std::{collections::BTreeMap, path::Path};

use crate::dataplane::maps::read_counters;

/// The text of a NUL-padded name field of `LB_SVC_INFO`.
pub(crate) fn text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Left-aligned columns separated by three spaces, like `kubectl get`.
pub fn format_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|title| title.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (index, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if index + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}   "));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// The counters of `LB_STATS` by name.
pub fn counters(pin_dir: &Path) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    Ok(read_counters(pin_dir)?
        .into_iter()
        .map(|(counter, value)| (counter.name(), value))
        .collect())
}
