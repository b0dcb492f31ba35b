//! Reading training data: the role-play dataset's parquet file, and local
//! parquet, JSONL and CSV files, with one column taken as the text.
//!
//! A file that cannot be read at all is an error; a bad row is reported
//! with its number and the rest still read, so callers can show a
//! validation report instead of failing on the first stray line.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::{Error, Result};

/// The file formats read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetFormat {
    /// Apache Parquet (what the hub's datasets use).
    Parquet,
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated with a header row.
    Csv,
}

impl DatasetFormat {
    /// The format from the file extension.
    pub fn detect(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("parquet") => Ok(Self::Parquet),
            Some("jsonl" | "ndjson" | "json") => Ok(Self::Jsonl),
            Some("csv") => Ok(Self::Csv),
            _ => Err(Error::BadDataset {
                path: path.into(),
                message: "unknown dataset format: use .parquet, .jsonl or .csv".into(),
            }),
        }
    }
}

/// One unusable row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RowProblem {
    /// 1-based row (JSONL: line; CSV: line counting the header; parquet: row).
    pub row: usize,
    /// What is wrong.
    pub message: String,
}

/// A file's shape and its first rows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetInfo {
    /// The file.
    pub path: PathBuf,
    /// Its format.
    pub format: DatasetFormat,
    /// Column names, in file order.
    pub columns: Vec<String>,
    /// Number of rows (for JSONL: non-empty lines).
    pub rows: usize,
    /// The first rows, every column as JSON.
    pub preview: Vec<Map<String, Value>>,
    /// Rows that could not be read.
    pub problems: Vec<RowProblem>,
}

/// One column's text, row by row.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct TextColumn {
    /// `(row, text)` for every usable row.
    pub texts: Vec<(usize, String)>,
    /// Rows without a usable text.
    pub problems: Vec<RowProblem>,
}

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::BadDataset {
        path: path.into(),
        message: message.into(),
    }
}

/// Calls `each(row, record)` for every row of the file; records are JSON objects.
fn for_each_row(
    path: &Path,
    mut each: impl FnMut(usize, std::result::Result<Map<String, Value>, String>),
) -> Result<(DatasetFormat, Vec<String>)> {
    let format = DatasetFormat::detect(path)?;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    match format {
        DatasetFormat::Parquet => {
            let reader = SerializedFileReader::new(file)
                .map_err(|e| bad(path, format!("not a readable parquet file: {e}")))?;
            let columns = reader
                .metadata()
                .file_metadata()
                .schema_descr()
                .root_schema()
                .get_fields()
                .iter()
                .map(|f| f.name().to_owned())
                .collect();
            let rows = reader
                .get_row_iter(None)
                .map_err(|e| bad(path, format!("not a readable parquet file: {e}")))?;
            for (i, row) in rows.enumerate() {
                match row {
                    Ok(row) => each(
                        i + 1,
                        Ok(row
                            .get_column_iter()
                            .map(|(k, v)| (k.clone(), field_json(v)))
                            .collect()),
                    ),
                    // A corrupt page ends the file: what follows cannot be found.
                    Err(e) => return Err(bad(path, format!("row {}: {e}", i + 1))),
                }
            }
            Ok((format, columns))
        }
        DatasetFormat::Jsonl => {
            let mut columns: Vec<String> = Vec::new();
            for (i, line) in BufReader::new(file).lines().enumerate() {
                let line = line.map_err(|e| match e.kind() {
                    std::io::ErrorKind::InvalidData => {
                        bad(path, format!("line {}: not UTF-8", i + 1))
                    }
                    _ => Error::io(path, e),
                })?;
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Value>(&line) {
                    Ok(Value::Object(m)) => {
                        for k in m.keys() {
                            if !columns.contains(k) {
                                columns.push(k.clone());
                            }
                        }
                        each(i + 1, Ok(m));
                    }
                    Ok(_) => each(i + 1, Err("not a JSON object".into())),
                    Err(e) => each(i + 1, Err(format!("not valid JSON: {e}"))),
                }
            }
            Ok((format, columns))
        }
        DatasetFormat::Csv => {
            let mut r = csv::ReaderBuilder::new().flexible(true).from_reader(file);
            let header: Vec<String> = r
                .headers()
                .map_err(|e| bad(path, format!("not a readable CSV header: {e}")))?
                .iter()
                .map(str::to_owned)
                .collect();
            for (i, rec) in r.records().enumerate() {
                let line = i + 2;
                match rec {
                    Ok(rec) if rec.len() != header.len() => each(
                        line,
                        Err(format!(
                            "{} fields, the header has {}",
                            rec.len(),
                            header.len()
                        )),
                    ),
                    Ok(rec) => each(
                        line,
                        Ok(header
                            .iter()
                            .zip(rec.iter())
                            .map(|(k, v)| (k.clone(), Value::String(v.to_owned())))
                            .collect()),
                    ),
                    Err(e) => each(line, Err(e.to_string())),
                }
            }
            Ok((format, header))
        }
    }
}

fn field_json(f: &Field) -> Value {
    match f {
        Field::Null => Value::Null,
        Field::Str(s) => Value::String(s.clone()),
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => (*n).into(),
        Field::Short(n) => (*n).into(),
        Field::Int(n) => (*n).into(),
        Field::Long(n) => (*n).into(),
        Field::UByte(n) => (*n).into(),
        Field::UShort(n) => (*n).into(),
        Field::UInt(n) => (*n).into(),
        Field::ULong(n) => (*n).into(),
        Field::Float(x) => {
            serde_json::Number::from_f64(f64::from(*x)).map_or(Value::Null, Value::Number)
        }
        Field::Double(x) => serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number),
        other => Value::String(other.to_string()),
    }
}

/// Reads a file's columns, row count and first `preview_rows` rows.
pub fn inspect(path: &Path, preview_rows: usize) -> Result<DatasetInfo> {
    let mut rows = 0;
    let mut preview = Vec::new();
    let mut problems = Vec::new();
    let (format, columns) = for_each_row(path, |row, rec| match rec {
        Ok(m) => {
            rows += 1;
            if preview.len() < preview_rows {
                preview.push(m);
            }
        }
        Err(message) => problems.push(RowProblem { row, message }),
    })?;
    Ok(DatasetInfo {
        path: path.into(),
        format,
        columns,
        rows,
        preview,
        problems,
    })
}

/// Reads one column as text. A missing column is an error naming the
/// columns there are; a row whose value is absent or not text is a problem.
pub fn read_text_column(path: &Path, column: &str) -> Result<TextColumn> {
    let mut out = TextColumn::default();
    let mut seen_column = false;
    let (_, columns) = for_each_row(path, |row, rec| match rec {
        Ok(mut m) => match m.remove(column) {
            Some(Value::String(s)) => {
                seen_column = true;
                out.texts.push((row, s));
            }
            Some(Value::Null) | None => out.problems.push(RowProblem {
                row,
                message: format!("no `{column}` value"),
            }),
            Some(other) => {
                seen_column = true;
                out.problems.push(RowProblem {
                    row,
                    message: format!("`{column}` is {other}, not text"),
                })
            }
        },
        Err(message) => out.problems.push(RowProblem { row, message }),
    })?;
    if !seen_column && !columns.iter().any(|c| c == column) {
        return Err(bad(
            path,
            format!(
                "no column `{column}`; the file has: {}",
                if columns.is_empty() {
                    "no columns".into()
                } else {
                    columns.join(", ")
                }
            ),
        ));
    }
    Ok(out)
}
