from bottleneck.cli import console

console()
