//! Rows of SQLite, read and written: times as text, JSON as text, the column readers and the errors.

use super::*;

// Encoding and decoding.

/// RFC 3339 in UTC with nine fractional digits: lossless, and fixed-width
/// so that text order is time order.
pub(super) fn timestamp(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

pub(super) fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|e| StoreError::Invalid(format!("cannot encode as JSON: {e}")))
}

impl Columns for SqliteRow {
    fn text(&self, name: &str) -> Result<String, String> {
        col(self, name)
    }
    fn opt_text(&self, name: &str) -> Result<Option<String>, String> {
        col(self, name)
    }
    fn int(&self, name: &str) -> Result<i64, String> {
        col(self, name)
    }
    fn flag(&self, name: &str) -> Result<bool, String> {
        col(self, name)
    }
    fn uuid(&self, name: &str) -> Result<Uuid, String> {
        uuid_col(self, name)
    }
    fn opt_uuid(&self, name: &str) -> Result<Option<Uuid>, String> {
        let text: Option<String> = col(self, name)?;
        text.map(|t| Uuid::try_parse(&t).map_err(|e| format!("column {name}: {e}")))
            .transpose()
    }
    fn time(&self, name: &str) -> Result<DateTime<Utc>, String> {
        time_col(self, name)
    }
    fn opt_time(&self, name: &str) -> Result<Option<DateTime<Utc>>, String> {
        opt_time_col(self, name)
    }
    fn json<T: DeserializeOwned>(&self, name: &str) -> Result<T, String> {
        json_col(self, name)
    }
    fn opt_json<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, String> {
        let text: Option<String> = col(self, name)?;
        text.map(|t| serde_json::from_str(&t).map_err(|e| format!("column {name}: {e}")))
            .transpose()
    }
    fn key(&self, name: &str) -> String {
        if let Ok(text) = self.try_get::<String, _>(name) {
            text
        } else if let Ok(number) = self.try_get::<i64, _>(name) {
            number.to_string()
        } else {
            format!("with an unreadable {name}")
        }
    }
}

pub(super) fn col<'r, T>(row: &'r SqliteRow, name: &str) -> Result<T, String>
where
    T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
{
    row.try_get(name).map_err(|e| format!("column {name}: {e}"))
}

pub(super) fn json_col<T: DeserializeOwned>(row: &SqliteRow, name: &str) -> Result<T, String> {
    let text: String = col(row, name)?;
    serde_json::from_str(&text).map_err(|e| format!("column {name}: {e}"))
}

pub(super) fn uuid_col(row: &SqliteRow, name: &str) -> Result<Uuid, String> {
    let text: String = col(row, name)?;
    Uuid::parse_str(&text).map_err(|e| format!("column {name}: {e}"))
}

pub(super) fn parse_time(text: &str, name: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("column {name}: {text:?}: {e}"))
}

pub(super) fn time_col(row: &SqliteRow, name: &str) -> Result<DateTime<Utc>, String> {
    let text: String = col(row, name)?;
    parse_time(&text, name)
}

pub(super) fn opt_time_col(row: &SqliteRow, name: &str) -> Result<Option<DateTime<Utc>>, String> {
    let text: Option<String> = col(row, name)?;
    text.map(|t| parse_time(&t, name)).transpose()
}

// ---------------------------------------------------------------------------
// Errors.

/// SQLite's own report that the file is damaged or not a database.
pub(super) fn is_corruption(e: &sqlx::Error) -> bool {
    const SQLITE_CORRUPT: i64 = 11;
    const SQLITE_NOTADB: i64 = 26;
    e.as_database_error()
        .and_then(|db| db.code())
        .and_then(|code| code.parse::<i64>().ok())
        .is_some_and(|code| matches!(code & 0xff, SQLITE_CORRUPT | SQLITE_NOTADB))
}

pub(super) fn read_error(e: sqlx::Error) -> StoreError {
    if is_corruption(&e) {
        StoreError::Corrupt(e.to_string())
    } else {
        StoreError::Unavailable(e.to_string())
    }
}

/// An error inside one append. A constraint the checks above did not catch
/// (a reused event id) is the caller's; the rest is the database's.
pub(super) fn write_error(e: sqlx::Error) -> StoreError {
    match e.as_database_error() {
        Some(db) if db.is_unique_violation() || db.is_check_violation() => {
            StoreError::Invalid(db.message().to_string())
        }
        _ => read_error(e),
    }
}
