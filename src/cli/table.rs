//! Plain-text tables for people (scripts use `--json`).

use std::fmt;

pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(
            cells
                .into_iter()
                .map(|c| crate::message::one_line(&c, 120))
                .collect(),
        );
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(c.chars().count());
                }
            }
        }
        let line = |f: &mut fmt::Formatter<'_>, cells: &[String]| -> fmt::Result {
            let last = cells.len().saturating_sub(1);
            for (i, c) in cells.iter().enumerate() {
                if i == last {
                    writeln!(f, "{c}")?;
                } else {
                    let pad = widths[i].saturating_sub(c.chars().count());
                    write!(f, "{c}{}  ", " ".repeat(pad))?;
                }
            }
            Ok(())
        };
        line(f, &self.headers)?;
        for r in &self.rows {
            line(f, r)?;
        }
        Ok(())
    }
}
