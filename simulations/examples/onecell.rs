use weft_node::Agent;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (p, n, seed): (&str, usize, u64) = (&args[1], args[2].parse().unwrap(), args[3].parse().unwrap());
    println!("{:?}", weft_sim::matrix::cell::<Agent>(p, n, seed));
}
