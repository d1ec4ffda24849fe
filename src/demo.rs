pub async fn run(_e: bool) -> anyhow::Result<bool> {
    Ok(true)
}
