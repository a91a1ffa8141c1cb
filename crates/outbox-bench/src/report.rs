//! Output: human tables printed as each scenario ends, machine-readable `RESULT` lines kept for
//! the end of the run.

use std::fmt::Write as _;
use std::io::Write as _;

#[derive(Default)]
pub(crate) struct Report {
    results: Vec<String>,
}

/// A plain-text table with aligned columns.
pub(crate) struct Table {
    title: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(title: impl Into<String>, header: &[&str]) -> Self {
        Self {
            title: title.into(),
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let cols = self.header.len();
        let mut width = vec![0usize; cols];
        for row in std::iter::once(&self.header).chain(&self.rows) {
            for (i, cell) in row.iter().enumerate().take(cols) {
                width[i] = width[i].max(cell.len());
            }
        }
        let line = |row: &Vec<String>| {
            let mut s = String::from("|");
            for (i, w) in width.iter().enumerate() {
                let cell = row.get(i).map_or("", String::as_str);
                let _ = write!(s, " {cell:<w$} |");
            }
            s
        };
        let mut out = format!("\n### {}\n\n", self.title);
        out.push_str(&line(&self.header));
        out.push('\n');
        out.push('|');
        for w in &width {
            out.push_str(&format!("-{}-|", "-".repeat(*w)));
        }
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }
}

impl Report {
    pub(crate) fn table(&mut self, table: &Table) {
        print!("{}", table.render());
        let _ = std::io::stdout().flush();
    }

    pub(crate) fn note(&mut self, text: impl AsRef<str>) {
        println!("{}", text.as_ref());
        let _ = std::io::stdout().flush();
    }

    /// `RESULT <scenario> <metrics>` where `metrics` is already `key=value ...`.
    pub(crate) fn result(&mut self, scenario: &str, metrics: impl AsRef<str>) {
        self.results
            .push(format!("RESULT {scenario} {}", metrics.as_ref()));
    }

    /// A result with a baseline: ratio = ours / baseline, both in throughput terms.
    pub(crate) fn result_vs(
        &mut self,
        scenario: &str,
        metrics: impl AsRef<str>,
        ours: f64,
        baseline: f64,
    ) {
        let ratio = if baseline > 0.0 { ours / baseline } else { 0.0 };
        self.results.push(format!(
            "RESULT {scenario} {} baseline={} ratio={ratio:.3}",
            metrics.as_ref(),
            fmt_num(baseline)
        ));
    }

    pub(crate) fn print_results(&self) {
        println!();
        for r in &self.results {
            println!("{r}");
        }
        let _ = std::io::stdout().flush();
    }
}

/// A figure without needless decimals: integers above 100, else up to 2 decimals.
pub(crate) fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}
