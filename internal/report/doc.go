// Package report formats figures for people: durations and counts with
// three significant digits in the unit or decimal prefix that suits them
// (Dur, SI, BytesSI), as the commands' status lines, summaries and the bench
// tables print them.
package report
