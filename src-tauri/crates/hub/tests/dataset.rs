//! Dataset files: a parquet file in the role-play dataset's schema (written
//! here with the parquet crate, snappy-compressed as the hub's are), JSONL
//! and CSV, and the errors for broken ones.

use std::path::Path;
use std::sync::Arc;

use dramatis_hub::Error;
use dramatis_hub::dataset::{DatasetFormat, inspect, read_text_column};
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

fn rows() -> Vec<[String; 3]> {
    (0..40)
        .map(|i| {
            [
                format!("Character {i}"),
                format!("A description with ünïcode №{i}"),
                format!("<|system|>You are {i}.</s>\n<|user|>Hi</s>\n<|assistant|>Hello, {i}!</s>"),
            ]
        })
        .collect()
}

fn write_parquet(path: &Path, rows: &[[String; 3]]) {
    let schema = Arc::new(
        parse_message_type(
            "message schema { OPTIONAL BYTE_ARRAY name (UTF8); OPTIONAL BYTE_ARRAY description (UTF8); OPTIONAL BYTE_ARRAY text (UTF8); }",
        )
        .unwrap(),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let mut w =
        SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    // Two row groups, as large files have.
    for part in rows.chunks(25) {
        let mut rg = w.next_row_group().unwrap();
        let mut col = 0;
        while let Some(mut c) = rg.next_column().unwrap() {
            let values: Vec<ByteArray> = part
                .iter()
                .map(|r| ByteArray::from(r[col].as_str()))
                .collect();
            let defs = vec![1i16; values.len()];
            c.typed::<ByteArrayType>()
                .write_batch(&values, Some(&defs), None)
                .unwrap();
            c.close().unwrap();
            col += 1;
        }
        rg.close().unwrap();
    }
    w.close().unwrap();
}

#[test]
fn parquet_in_the_roleplay_schema_reads_back_row_for_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train-00000-of-00001.parquet");
    let rows = rows();
    write_parquet(&path, &rows);
    let info = inspect(&path, 3).unwrap();
    assert_eq!(info.format, DatasetFormat::Parquet);
    assert_eq!(info.columns, ["name", "description", "text"]);
    assert_eq!(info.rows, rows.len());
    assert_eq!(info.preview.len(), 3);
    assert_eq!(info.preview[1]["description"], rows[1][1].as_str());
    let col = read_text_column(&path, "text").unwrap();
    assert!(col.problems.is_empty());
    let texts: Vec<&str> = col.texts.iter().map(|(_, t)| t.as_str()).collect();
    let want: Vec<&str> = rows.iter().map(|r| r[2].as_str()).collect();
    assert_eq!(texts, want);
    assert_eq!(col.texts[39].0, 40);
}

#[test]
fn a_corrupt_or_truncated_parquet_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.parquet");
    write_parquet(&path, &rows());
    let bytes = std::fs::read(&path).unwrap();

    let truncated = dir.path().join("truncated.parquet");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = inspect(&truncated, 3).unwrap_err();
    assert!(matches!(err, Error::BadDataset { .. }), "{err}");
    assert!(err.to_string().contains("truncated.parquet"), "{err}");

    // Scribble over the data pages (the footer stays valid).
    let mut scribbled = bytes.clone();
    for b in &mut scribbled[8..bytes.len() / 2] {
        *b = 0xA5;
    }
    let corrupt = dir.path().join("corrupt.parquet");
    std::fs::write(&corrupt, &scribbled).unwrap();
    let err = read_text_column(&corrupt, "text").unwrap_err();
    assert!(matches!(err, Error::BadDataset { .. }), "{err}");

    let not = dir.path().join("not.parquet");
    std::fs::write(&not, b"name,text\n").unwrap();
    assert!(
        inspect(&not, 1)
            .unwrap_err()
            .to_string()
            .contains("not a readable parquet file")
    );
}

#[test]
fn a_missing_column_names_the_columns_there_are() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.parquet");
    write_parquet(&path, &rows());
    let err = read_text_column(&path, "content").unwrap_err().to_string();
    assert!(
        err.contains("no column `content`") && err.contains("name, description, text"),
        "{err}"
    );
}

#[test]
fn jsonl_reports_bad_lines_by_number_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    std::fs::write(
        &path,
        "{\"text\": \"one\"}\n\n{\"text\": 2}\nnot json\n[1]\n{\"other\": \"x\"}\n{\"text\": \"six\", \"n\": 1}\n",
    )
    .unwrap();
    let col = read_text_column(&path, "text").unwrap();
    assert_eq!(
        col.texts,
        vec![(1, "one".to_owned()), (7, "six".to_owned())]
    );
    let rows: Vec<usize> = col.problems.iter().map(|p| p.row).collect();
    assert_eq!(rows, [3, 4, 5, 6]);
    assert!(col.problems[1].message.contains("not valid JSON"));
    let info = inspect(&path, 10).unwrap();
    assert_eq!(info.rows, 4);
    assert_eq!(info.columns, ["text", "other", "n"]);
}

#[test]
fn csv_maps_a_chosen_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.csv");
    std::fs::write(
        &path,
        "id,dialogue\n1,\"Hello, there\"\n2\n3,\"multi\nline\"\n",
    )
    .unwrap();
    let col = read_text_column(&path, "dialogue").unwrap();
    assert_eq!(
        col.texts,
        vec![
            (2, "Hello, there".to_owned()),
            (4, "multi\nline".to_owned())
        ]
    );
    assert_eq!(col.problems.len(), 1);
    assert_eq!(col.problems[0].row, 3);
    assert!(matches!(
        inspect(&dir.path().join("d.txt"), 1),
        Err(Error::BadDataset { .. })
    ));
}
