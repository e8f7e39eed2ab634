//! The run's report: `results.json`, `report.md` and the PNG plots.

pub mod markdown;
pub mod plot;

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::results::Results;

/// Writes `results.json`, `report.md` and the plots into `dir`; returns the files written.
pub fn write(results: &Results, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let json = dir.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(results)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let report = dir.join("report.md");
    std::fs::write(&report, markdown::render(results))
        .with_context(|| format!("writing {}", report.display()))?;
    let mut written = vec![json, report];
    written.extend(plot::write_plots(results, dir)?);
    Ok(written)
}
