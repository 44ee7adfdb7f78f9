//! The admin UI: the JSON API under `/admin/api` ([`api`]) and the HTML pages ([`pages`]), both
//! behind the admin session (`app::session`).

pub mod api;
pub mod pages;
