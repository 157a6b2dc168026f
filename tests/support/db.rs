//! A fresh Postgres database per test: a copy of a template migrated once per set of
//! migrations (creating a database from a template copies files instead of running every
//! migration again), dropped when the [`TestDb`] is dropped — also when the test fails.

use std::hash::{Hash, Hasher};

/// Server URL without a database name (the machine's Postgres unless overridden).
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_SERVER")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A database created for one test, dropped on drop.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// A database with every migration applied (a copy of the migrated template).
    pub async fn create() -> Self {
        let template = template().await;
        Self::create_from(Some(&template)).await
    }

    /// An empty database, for tests of the migration code itself.
    pub async fn empty() -> Self {
        Self::create_from(None).await
    }

    async fn create_from(template: Option<&str>) -> Self {
        let name = super::unique("t");
        let from = template
            .map(|t| format!(" TEMPLATE {t}"))
            .unwrap_or_default();
        admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}{from}"))
            .await
            .expect("create test database");
        let url = format!("{}/{name}", server_url());
        Self { name, url }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop may run inside a runtime (or while a test unwinds): a thread of its own with a
        // runtime of its own drops the database.
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|runtime| runtime.block_on(drop_database(&name)))
        })
        .join();
        if dropped.is_err() {
            eprintln!("test database {} not dropped", self.name);
        }
    }
}

async fn drop_database(name: &str) {
    let _ = admin()
        .await
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
}

/// The name of the migrated template for the embedded migrations, created on first use. Test
/// processes run in parallel: an advisory lock makes one of them build it, and the template
/// only gets its final name once fully migrated.
async fn template() -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    processor::db::MIGRATIONS.hash(&mut hasher);
    let name = format!("t_template_{:016x}", hasher.finish());
    let admin = admin().await;
    admin
        .batch_execute("SELECT pg_advisory_lock(7357001)")
        .await
        .expect("template lock");
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .expect("look up the template")
        .is_some();
    if !exists {
        let building = format!("{name}_building");
        for sql in [
            format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"),
            format!("CREATE DATABASE {building}"),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .expect("create the template");
        }
        migrate(&format!("{}/{building}", server_url())).await;
        for sql in [
            format!("ALTER DATABASE {building} RENAME TO {name}"),
            format!("ALTER DATABASE {name} WITH IS_TEMPLATE true"),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .expect("publish the template");
        }
    }
    admin
        .batch_execute("SELECT pg_advisory_unlock(7357001)")
        .await
        .expect("template unlock");
    name
}

/// Applies the migrations through the processor's own code, then closes every connection (a
/// template must have none).
async fn migrate(url: &str) {
    let env = shared::config::Env::from_pairs([("DATABASE_URL", url)]);
    let config = processor::config::Config::from_env(&env).expect("template config");
    let pool = processor::db::pool(&config).expect("template pool");
    processor::db::prepare(&config, &pool)
        .await
        .expect("migrate the template");
    pool.close();
}

async fn admin() -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(&format!("{}/postgres", server_url()), tokio_postgres::NoTls)
            .await
            .expect("connect to the test Postgres server");
    tokio::spawn(connection);
    client
}
