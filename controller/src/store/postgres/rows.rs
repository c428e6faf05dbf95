//! Rows of PostgreSQL, read and written: the column readers and the errors.

use super::*;

// ---------------------------------------------------------------------------
// Encoding and decoding.
pub(super) fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(value)
        .map_err(|e| StoreError::Invalid(format!("cannot encode as JSON: {e}")))
}

impl Columns for PgRow {
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
        col(self, name)
    }
    fn opt_uuid(&self, name: &str) -> Result<Option<Uuid>, String> {
        col(self, name)
    }
    fn time(&self, name: &str) -> Result<DateTime<Utc>, String> {
        col(self, name)
    }
    fn opt_time(&self, name: &str) -> Result<Option<DateTime<Utc>>, String> {
        col(self, name)
    }
    fn json<T: DeserializeOwned>(&self, name: &str) -> Result<T, String> {
        json_col(self, name)
    }
    fn opt_json<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, String> {
        let value: Option<serde_json::Value> = col(self, name)?;
        value
            .map(|v| serde_json::from_value(v).map_err(|e| format!("column {name}: {e}")))
            .transpose()
    }
    fn key(&self, name: &str) -> String {
        if let Ok(text) = self.try_get::<String, _>(name) {
            text
        } else if let Ok(id) = self.try_get::<Uuid, _>(name) {
            id.to_string()
        } else if let Ok(number) = self.try_get::<i64, _>(name) {
            number.to_string()
        } else {
            format!("with an unreadable {name}")
        }
    }
}

pub(super) fn col<'r, T>(row: &'r PgRow, name: &str) -> Result<T, String>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    row.try_get(name).map_err(|e| format!("column {name}: {e}"))
}

pub(super) fn json_col<T: DeserializeOwned>(row: &PgRow, name: &str) -> Result<T, String> {
    let value: serde_json::Value = col(row, name)?;
    serde_json::from_value(value).map_err(|e| format!("column {name}: {e}"))
}

// ---------------------------------------------------------------------------
// Errors.

pub(super) fn unavailable(context: &str, e: &sqlx::Error) -> StoreError {
    StoreError::Unavailable(format!("{context}: {e}"))
}

/// PostgreSQL's own report that stored data is damaged (class XX:
/// `data_corrupted`, `index_corrupted`).
pub(super) fn is_corruption(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| code == "XX001" || code == "XX002")
}

/// A read that failed: damaged data is corrupt; everything else (lost
/// connection, pool timeout, server shutting down, statement timeout) is
/// worth retrying.
pub(super) fn read_error(e: sqlx::Error) -> StoreError {
    if is_corruption(&e) || matches!(e, sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_)) {
        StoreError::Corrupt(e.to_string())
    } else {
        StoreError::Unavailable(e.to_string())
    }
}

/// A write that failed: a constraint or a value PostgreSQL refuses (class
/// 23 integrity violation, class 22 data exception) or that cannot be
/// encoded is the caller's; the rest is the database's.
pub(super) fn write_error(e: sqlx::Error) -> StoreError {
    if let Some(db) = e.as_database_error()
        && let Some(code) = db.code()
        && (code.starts_with("23") || code.starts_with("22"))
    {
        return StoreError::Invalid(db.message().to_string());
    }
    if let sqlx::Error::Encode(cause) = &e {
        return StoreError::Invalid(format!("cannot encode a value: {cause}"));
    }
    read_error(e)
}
