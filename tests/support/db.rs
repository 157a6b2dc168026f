//! A fresh Postgres database per test, dropped by [`TestDb::cleanup`].

/// Server URL without a database name (the machine's Postgres unless overridden).
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_SERVER")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A database created for one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// Creates an empty database with a unique name. Migrations are the caller's to run (through
    /// the processor's own migrate code, so tests exercise it).
    pub async fn create() -> Self {
        let name = super::unique("t");
        let admin = admin().await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let url = format!("{}/{name}", server_url());
        Self { name, url }
    }

    /// Drops the database (forcing off any connection still open).
    pub async fn cleanup(self) {
        let admin = admin().await;
        let _ = admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

async fn admin() -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(&format!("{}/postgres", server_url()), tokio_postgres::NoTls)
            .await
            .expect("connect to the test Postgres server");
    tokio::spawn(connection);
    client
}
